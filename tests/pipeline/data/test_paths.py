"""pipeline/data/paths.py: image paths confined to the dataset, bounded reads that never block,
and S3 reads retried through real 5xx answers (a faulty HTTP server in front of moto). No Ray."""

from __future__ import annotations

import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.data import paths
from pipeline.data.paths import ReadFailure, ReadLimits, read_image_bytes, resolve_image_path


def test_relative_paths_stay_inside_a_local_root(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "zero.png").symlink_to("/dev/zero")
    inside = str(root / "images" / "a.png")
    assert resolve_image_path(str(root), "images/a.png") == (inside, "")
    assert resolve_image_path(str(root), inside) == (inside, "")  # absolute, but inside
    assert resolve_image_path(str(root), "images/../images/a.png") == (inside, "")
    for outside in ("../secret.png", str(tmp_path / "secret.png"), "/etc/passwd", "link.png", "zero.png",
                    "s3://other-bucket/a.png", "images/\x89PNG\r\n\x1a\n", "", "a\x00b.png"):  # fmt: skip
        assert resolve_image_path(str(root), outside) == (None, "bad_path"), outside
    # --allow-external-paths: absolute paths and URIs as given, relative ones still from the root.
    assert resolve_image_path(str(root), "/etc/passwd", allow_external=True) == ("/etc/passwd", "")
    assert resolve_image_path(str(root), "s3://b/x.png", allow_external=True) == ("s3://b/x.png", "")
    assert resolve_image_path(str(root), "images/a.png", allow_external=True) == (str(root / "images/a.png"), "")


def test_s3_paths_stay_inside_the_root_and_its_bucket() -> None:
    root = "s3://bucket/datasets/ds"
    assert resolve_image_path(root, "images/a.png") == ("s3://bucket/datasets/ds/images/a.png", "")
    assert resolve_image_path(root, "s3://bucket/datasets/ds/a.png") == ("s3://bucket/datasets/ds/a.png", "")
    for outside in ("../other/a.png", "images/../../x.png", "./a.png", "s3://other-bucket/datasets/ds/a.png",
                    "s3://bucket/datasets/ds-private/a.png", "s3://bucket/datasets/ds/../x.png", "/etc/passwd"):  # fmt: skip
        assert resolve_image_path(root, outside) == (None, "bad_path"), outside


def _fails_within(seconds: float, fn) -> BaseException | None:
    """Run `fn` in a daemon thread; the exception it raised, or a failure if it is still running."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still running after {seconds}s (blocked or reading without end)"
    return out[0]


def test_devices_fifos_and_folders_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for a blocking read would wait for a writer forever
    for path in ("/dev/zero", str(fifo), str(tmp_path)):
        err = _fails_within(5, lambda p=path: read_image_bytes(p, 1 << 30))
        assert isinstance(err, ReadFailure) and err.reason == "bad_path", path
        assert "not a regular file" in str(err)


def test_files_over_the_byte_limit_are_too_large(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x" * 101)
    with pytest.raises(ReadFailure, match="too_large.*101 bytes > max_image_bytes=100"):
        read_image_bytes(str(tmp_path / "a.png"), 100)
    assert read_image_bytes(str(tmp_path / "a.png"), 101) == b"x" * 101
    with pytest.raises(ReadFailure, match="missing_file"):
        read_image_bytes(str(tmp_path / "nope.png"), 100)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_image_bytes must be a positive integer, got 0"):
        ReadLimits(max_image_bytes=0)
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        ReadLimits(max_image_pixels=2.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------- S3 retries, against real 5xx answers

INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                  b"<Message>We encountered an internal error. Please try again.</Message></Error>")  # fmt: skip


class FlakyS3:
    """A real HTTP server in front of moto: the first `fail` requests for one object get S3's
    500 InternalError, everything else is forwarded. `seen` lists the methods asked for it."""

    def __init__(self, upstream: str, object_path: str, fail: int) -> None:
        host, port = upstream.split("//")[1].split(":")
        self.seen: list[str] = []
        self.fail = fail
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.split("?")[0] == object_path:
                    proxy.seen.append(self.command)
                    if proxy.fail > 0:
                        proxy.fail -= 1
                        return self.reply(500, [("Content-Type", "application/xml")], INTERNAL_ERROR)
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
                self.reply(resp.status, headers, resp.read(), sized=self.command != "HEAD")
                conn.close()

            def reply(self, status: int, headers: list, data: bytes, sized: bool = True) -> None:
                self.send_response(status)
                for k, v in headers:
                    if not (sized and k.lower() == "content-length"):
                        self.send_header(k, v)
                if sized:
                    self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_object(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """s3://inkseed-test/paths-test/a.png behind a FlakyS3; botocore's own retries are off
    (AWS_MAX_ATTEMPTS=1), so the retries seen are ingestion's."""
    storage.write_bytes("s3://inkseed-test/paths-test/a.png", b"an image")
    proxies: list[FlakyS3] = []

    def make(fail: int, key: str = "a.png") -> FlakyS3:
        proxy = FlakyS3(s3_server, f"/inkseed-test/paths-test/{key}", fail)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # a new S3 filesystem for this endpoint
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def test_s3_reads_are_retried_through_transient_errors(flaky_object) -> None:
    proxy = flaky_object(fail=2)
    assert read_image_bytes("s3://inkseed-test/paths-test/a.png", 1000) == b"an image"
    assert proxy.seen[:3] == ["HEAD", "HEAD", "HEAD"] and proxy.seen[-1] == "GET"  # 2 failures, then read


def test_s3_reads_that_keep_failing_are_read_errors_after_the_last_attempt(flaky_object) -> None:
    proxy = flaky_object(fail=100)
    with pytest.raises(ReadFailure, match=r"read_error: s3://inkseed-test/paths-test/a\.png: .*Internal"):
        read_image_bytes("s3://inkseed-test/paths-test/a.png", 1000)
    assert len(proxy.seen) == paths.READ_ATTEMPTS == 4


def test_missing_and_oversized_s3_objects_are_not_retried(flaky_object) -> None:
    proxy = flaky_object(fail=0, key="missing.png")
    with pytest.raises(ReadFailure, match="missing_file"):
        read_image_bytes("s3://inkseed-test/paths-test/missing.png", 1000)
    assert proxy.seen == ["HEAD"]
    proxy = flaky_object(fail=0)
    with pytest.raises(ReadFailure, match="too_large.*8 bytes > max_image_bytes=4"):
        read_image_bytes("s3://inkseed-test/paths-test/a.png", 4)
    assert "GET" not in proxy.seen  # refused from the HEAD's size, not by downloading
