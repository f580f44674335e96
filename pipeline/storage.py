"""Local paths and s3:// URIs behind one small API.

Every job reads and writes through here, so a dataset, a Ray Train storage path or a
generation output can be a local folder or any S3-compatible store. s3:// goes through
s3fs (wrapped as a pyarrow filesystem), so the endpoint and credentials come from the usual
AWS environment variables and config files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/...).

Every failure of a read, write, list or delete comes out as one `StorageError` whose message
names the path or URI and says what to do (disk full, permission, bucket, endpoint).
`compare_and_swap` is the one atomic read-modify-write (the generation lease): an flock'ed file
locally, conditional PUT/DELETE (If-None-Match / If-Match) on S3.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator

import pyarrow.fs as pafs

from model.io import atomic_write, fsync_dir
from model.io import remove_temp_files as _remove_local_temp_files


class StorageError(RuntimeError):
    """A path or URI that cannot be read or written, with the reason."""


# What to do about an OSError, by errno: the advice ends the one-line message.
_ADVICE = {
    errno.ENOSPC: "no space left on device: free space there or choose another output",
    errno.EDQUOT: "disk quota exceeded: free space there or choose another output",
    errno.EACCES: "permission denied: fix the permissions or choose another output",
    errno.EPERM: "permission denied: fix the permissions or choose another output",
    errno.EROFS: "read-only file system: choose another output",
}


def describe(e: BaseException) -> str:
    """A one-line description of a storage failure: the advice for a known errno, else the
    exception's type and first line."""
    if isinstance(e, OSError) and e.errno in _ADVICE:
        return _ADVICE[e.errno]
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _named(uri: str, action: str) -> Iterator[None]:
    """Turn any backend failure (OSError, botocore, pyarrow) into a StorageError naming `uri`."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        if action == "read":
            raise StorageError(f"{uri}: no such file") from e
        raise StorageError(f"{action} {uri}: {describe(e)}{_s3_hint(uri)}") from e
    except Exception as e:  # noqa: BLE001  (every backend error means the same thing to the user)
        raise StorageError(f"{action} {uri}: {describe(e)}{_s3_hint(uri)}") from e


def _s3_hint(uri: str) -> str:
    return " (check the bucket, your AWS credentials and AWS_ENDPOINT_URL)" if is_s3(uri) else ""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        settings = tuple(os.environ.get(k) for k in _S3_SETTINGS)
        return _s3(settings, os.getpid()), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


# The environment an S3 filesystem is built from: a change of any of them builds a new one.
_S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=8)
def _s3(settings: tuple[str | None, ...], pid: int) -> pafs.FileSystem:
    """One S3 filesystem per process and S3 environment: a new s3fs per file costs a connection
    setup. The process id is in the key because fsspec instances are not fork-safe, and the
    listing cache is off: other processes (actors, a second job) write to the same prefixes."""
    import s3fs  # imported lazily: local runs never need botocore

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _s3fs():
    """The s3fs instance behind `filesystem()`'s S3 filesystem (for the conditional requests)."""
    settings = tuple(os.environ.get(k) for k in _S3_SETTINGS)
    return _s3(settings, os.getpid()).handler.fs


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _named(uri, "look up"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    with _named(uri, "look up"):
        return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with _named(uri, "read"), fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, *, durable: bool = False) -> None:
    """Write a whole file atomically: locally through model.io.atomic_write (temp file, fsync,
    rename), so a reader never sees half a file, even after a power loss; `durable` also fsyncs
    the folder, so the new name survives one too. An S3 PUT is atomic and durable by itself."""
    fs, path = filesystem(uri)
    with _named(uri, "write"):
        if is_s3(uri):  # no folders to make on S3 (a create_dir per PNG would cost a request each)
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        atomic_write(path, data, sync_dir=durable)  # makes the parent folders


def sync_dir(uri: str) -> None:
    """Make the files renamed into a local folder durable (fsync the folder); a no-op on S3."""
    if not is_s3(uri):
        fsync_dir(filesystem(uri)[1])


def remove_temp_files(uri: str) -> int:
    """Delete the temp files killed local writes left directly in a folder (S3 has none)."""
    return 0 if is_s3(uri) else _remove_local_temp_files(filesystem(uri)[1])


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Full URIs/paths of the files directly under a folder (sorted); [] when it does not exist."""
    fs, path = filesystem(uri)
    with _named(uri, "list"):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return [join(uri, n) for n in names if n.endswith(suffix)]


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    with _named(uri, "delete"):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def delete_file(uri: str) -> None:
    """Delete one file; a missing file is not an error."""
    fs, path = filesystem(uri)
    with _named(uri, "delete"):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)


class _Verdict:
    """What `compare_and_swap`'s decide returns instead of new bytes."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


KEEP, DELETE = _Verdict("KEEP"), _Verdict("DELETE")


def compare_and_swap(uri: str, decide: Callable[[bytes | None], bytes | _Verdict]) -> None:
    """Atomically replace the small file at `uri` by decide(its content, or None when absent):
    new bytes to write, DELETE to remove it, KEEP to leave it. No other compare_and_swap of the
    same file runs between the read and the write. `decide` may be called more than once (on S3,
    after a conflict) and must not raise: record its verdict in a closure.

    Locally: an exclusive flock on the file itself (the kernel drops it when the holder dies), the
    content rewritten in place and fsynced; readers that go through here never see half of it.
    On S3: a GET, then a PUT with If-Match: <etag> (If-None-Match: * when absent) or a DELETE with
    If-Match, retried from the GET on 412 Precondition Failed. This needs a store that honours
    conditional writes (AWS S3, MinIO, moto's server): one that ignores the headers makes it a
    plain, racy read-then-write."""
    if is_s3(uri):
        _cas_s3(uri, decide)
    else:
        with _named(uri, "update"):
            _cas_local(filesystem(uri)[1], decide)


def _cas_local(path: str, decide: Callable[[bytes | None], bytes | _Verdict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # deleted (and maybe re-created) by another swap between our open and our lock?
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # the finally closes this fd; open the current file again
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            new = decide(data or None)  # an empty file is the absent state (created by our open)
            if new is DELETE or (new is KEEP and not data):
                os.unlink(path)
            elif new is not KEEP:
                os.ftruncate(fd, 0)
                os.pwrite(fd, new, 0)
                os.fsync(fd)
            return
        finally:
            os.close(fd)


async def _s3_get(fs, bucket: str, key: str) -> tuple[bytes | None, str | None]:
    try:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None, None
    try:
        return await resp["Body"].read(), resp["ETag"]
    finally:
        resp["Body"].close()


def _precondition_failed(e: BaseException) -> bool:
    """A conditional request that lost a race (412, or 409 ConditionalRequestConflict)."""
    response = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def _cas_s3(uri: str, decide: Callable[[bytes | None], bytes | _Verdict], attempts: int = 40) -> None:
    from fsspec.asyn import sync

    fs = _s3fs()
    bucket, key, _ = fs.split_path(uri)
    for attempt in range(attempts):
        with _named(uri, "read"):
            current, etag = sync(fs.loop, _s3_get, fs, bucket, key)
        new = decide(current)
        if new is KEEP or (new is DELETE and current is None):
            return
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            with _named(uri, "update"):
                if new is DELETE:
                    fs.call_s3("delete_object", Bucket=bucket, Key=key, **cond)
                else:
                    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=new, **cond)
            return
        except StorageError as e:
            if not _precondition_failed(e.__cause__ or e):
                raise
        # Someone else's write won: back off (jittered, so contenders spread out), read it, decide again.
        time.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))
    raise StorageError(f"update {uri}: it kept changing under {attempts} conditional writes; try again")


def check_writable(uri: str) -> None:
    """Raise StorageError naming the URI when a probe file cannot be written and removed there."""
    probe = join(uri, f".inkseed-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except Exception as e:  # any backend error means the same thing to the user
        cause = e.__cause__ if isinstance(e, StorageError) and e.__cause__ else e
        raise StorageError(f"output {uri!r} is not writable: {describe(cause)}{_s3_hint(uri)}") from e


def open_checkpoint(uri: str, device: str = "cpu"):
    """model.checkpoint.load_checkpoint for a local folder or an s3:// prefix (its files are read
    through model.checkpoint.read_checkpoint_files; the hashes are verified on load). Returns an Inkseed."""
    from model.checkpoint import load_checkpoint, load_checkpoint_files, read_checkpoint_files

    if not is_s3(uri):
        return load_checkpoint(uri, device=device)
    ink = load_checkpoint_files(read_checkpoint_files(lambda name: read_bytes(join(uri, name)), uri), device)
    ink.path = uri
    return ink
