"""jobs.demo served for real: `python -m jobs.demo` in a subprocess on a free port, each endpoint
called with gradio_client and checked against jobs.sample (same bytes, captions, alignment) or
against a plain-Python reading of the manifest (Browse, also over 120K rows); then one real
browser (Debian's chromium through selenium) clicks Generate and finds the image and caption,
and saves the screenshot README.md shows (docs/demo.png)."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.demo_browse import query_page
from model.images import png_bytes
from pipeline.data.engrave import make_sample
from pipeline.generation.manifest import SCHEMA

REPO = Path(__file__).resolve().parents[2]
BIG_ROWS = 120_000
SUBJECTS = ("ship", "windmill", "tower", "oak tree", "church", "bridge", "lighthouse", "cottage")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(default_run, tmp_path_factory):
    """The demo serving the embedded checkpoint, its Browse tab on the default run: its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.demo", "--port", str(port), "--run", str(default_run[0])],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"jobs.demo exited:\n{log.read_text()}"
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                assert time.time() < deadline, f"jobs.demo did not answer on {url}:\n{log.read_text()}"
                time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # stops as Ctrl-C does; on a loaded machine give it time
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
            raise AssertionError(f"jobs.demo ignored SIGTERM for 120 s:\n{log.read_text()[-2000:]}") from None


@pytest.fixture(scope="module")
def client(demo):
    from gradio_client import Client

    return Client(demo, verbose=False)


def test_the_endpoints_have_their_names(client):
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/caption", "/illustrate", "/interpolate", "/browse"} <= named


@pytest.mark.slow  # the demo's sampling endpoints against jobs.sample (test_sample checks jobs.sample against the manifest)
def test_generate_equals_jobs_sample_and_the_manifest(client, run_sample, default_run, tmp_path):
    gallery, table = client.predict(4, 3, api_name="/generate")
    expected = run_sample("--seed", "4", "--seed", "5", "--seed", "6", "--out", str(tmp_path))["samples"]
    _, rows = default_run
    assert [sha256_file(g["image"]) for g in gallery] == [s["image_sha256"] for s in expected]
    assert [s["image_sha256"] for s in expected] == [rows[s]["image_sha256"] for s in (4, 5, 6)]
    assert [r[:3] for r in table["data"]] == [[s["seed"], round(s["alignment"], 4), s["caption"]] for s in expected]
    assert [g["caption"] for g in gallery] == [f"{s['seed']}: {s['caption']} ({s['alignment']:.3f})" for s in expected]


def test_caption_equals_jobs_sample(client, run_sample, tmp_path):
    from gradio_client import handle_file

    _, _, image = make_sample(777, 0, 128)
    path = tmp_path / "engraving.png"
    path.write_bytes(png_bytes(image))
    assert client.predict(handle_file(str(path)), api_name="/caption") == \
        run_sample("--caption-image", str(path))["samples"][0]["caption"]  # fmt: skip


@pytest.mark.slow  # the demo's sampling endpoints against jobs.sample (test_sample checks jobs.sample against the manifest)
def test_illustrate_equals_jobs_sample(client, run_sample, tmp_path):
    text = "a print of a lighthouse on the coast, on the right, under the sun, by day"
    gallery, table = client.predict(text, 11, 2, api_name="/illustrate")
    expected = run_sample("--illustrate", text, "--seed", "11", "--seed", "12", "--out", str(tmp_path))["samples"]
    assert [sha256_file(g["image"]) for g in gallery] == [s["image_sha256"] for s in expected]
    assert [r[:3] for r in table["data"]] == [[s["seed"], round(s["alignment"], 4), text] for s in expected]


@pytest.mark.slow  # the demo's sampling endpoints against jobs.sample (test_sample checks jobs.sample against the manifest)
def test_interpolate_equals_jobs_sample(client, run_sample, tmp_path):
    strip, table = client.predict(2, 7, 4, api_name="/interpolate")
    expected = run_sample("--interpolate", "2", "7", "--steps", "4", "--out", str(tmp_path))
    assert sha256_file(strip) == expected["image_sha256"] == sha256_file(expected["image_path"])
    assert table["data"] == [[round(f["t"], 4), round(f["alignment"], 4), f["caption"]] for f in expected["frames"]]


def test_browse_filters_sorts_and_pages_a_real_run(client, default_run):
    out, rows = default_run
    word = max(re.findall(r"[a-z]+", rows[0]["caption"]), key=len)  # a word seed 0's caption has
    lo, hi = 0.5, 0.99
    match = sorted((r for r in rows.values() if re.search(rf"\b{word}\b", r["caption"], re.I) and lo <= r["alignment"] <= hi),
                   key=lambda r: (-r["alignment"], r["seed"]))  # fmt: skip
    assert match, f"no row of the run has {word!r}"
    gallery, table, summary, page = client.predict(str(out), word.upper(), lo, hi, "alignment, highest first", 1,
                                                   api_name="/browse")  # fmt: skip
    assert page == 1 and f"**{len(match)}** matching samples" in summary
    shown = match[:24]
    assert [r[0] for r in table["data"]] == [r["seed"] for r in shown]
    assert [r[2] for r in table["data"]] == [r["caption"] for r in shown]
    assert [sha256_file(g["image"]) for g in gallery] == [r["image_sha256"] for r in shown]
    # A page past the end shows the last page; a folder that is no run is an error naming it.
    _, table, _, page = client.predict(str(out), "", -1, 1, "seed", 99, api_name="/browse")
    assert page == 3 and [r[0] for r in table["data"]] == list(range(48, 66))
    with pytest.raises(Exception, match="no manifest"):
        client.predict(str(out / "images"), "", -1, 1, "seed", 1, api_name="/browse")


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A 120K-row manifest (4 parts) with known captions and alignments, no images."""
    out = tmp_path_factory.mktemp("big-run")
    seed = np.arange(BIG_ROWS, dtype=np.int64)
    caption = np.array([f"an engraving of a {SUBJECTS[i % 8]} number {i}" for i in range(BIG_ROWS)], dtype=object)
    alignment = (((seed * 7919) % 2001 - 1000) / 1000).astype(np.float32)
    (out / "manifest").mkdir()
    for part, at in enumerate(range(0, BIG_ROWS, 30_000)):
        n = slice(at, at + 30_000)
        columns = {"seed": seed[n], "shard": np.full(30_000, part, np.int32), "caption": caption[n],
                   "image_path": [f"images/{part:05d}/{s}.png" for s in seed[n]], "image_sha256": ["0" * 64] * 30_000,
                   "width": np.full(30_000, 128, np.int32), "height": np.full(30_000, 128, np.int32),
                   "alignment": alignment[n], "model_digest": ["d"] * 30_000, "run_id": ["r"] * 30_000,
                   "created_at": pa.array([0] * 30_000, pa.timestamp("us", tz="UTC"))}  # fmt: skip
        pq.write_table(pa.table(columns, schema=SCHEMA), out / "manifest" / f"part-{part:05d}.parquet")
    return out, {"seed": seed, "caption": caption, "alignment": alignment}


def test_browse_pages_through_120k_rows_in_the_query(big_run, client):
    out, cols = big_run
    started = time.perf_counter()
    page = query_page(str(out), "windmill", (0.0, 0.5), "alignment, lowest first", 7, 50)
    took = time.perf_counter() - started
    keep = np.array(["windmill" in c for c in cols["caption"]]) & (cols["alignment"] >= 0) & (cols["alignment"] <= 0.5)
    order = np.lexsort((cols["seed"][keep], cols["alignment"][keep]))
    assert page.total == keep.sum() and page.pages == -(-keep.sum() // 50) and page.page == 7
    assert [r["seed"] for r in page.rows] == cols["seed"][keep][order][300:350].tolist()
    assert took < 5, f"one page of 120K rows took {took:.1f} s"
    # Over the API the browser gets one page of rows, not the run.
    _, table, summary, _ = client.predict(str(out), "", -1, 1, "seed", 2, api_name="/browse")
    assert [r[0] for r in table["data"]] == list(range(24, 48))
    assert "**120,000** matching samples" in summary and "page 2 of 5,000" in summary and "24 images missing" in summary


def browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.mark.slow  # a real browser (chromium) on the demo
def test_a_real_browser_generates_seed_0(demo, run_sample, tmp_path):
    paths = browser_paths()
    if paths is None:
        reason = "no chromium + chromedriver here (apt-get install -y chromium chromium-driver; .ci/run does it as root)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1300"):
        options.add_argument(arg)
    expected = run_sample("--seed", "0", "--out", str(tmp_path))["samples"][0]["caption"]
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    try:
        driver.get(demo)
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate-button"))
        driver.find_element(By.CSS_SELECTOR, "#generate-button").click()
        loaded = "return [...document.querySelectorAll('#generate-gallery img')].filter(i => i.naturalWidth > 0).length"
        WebDriverWait(driver, 180).until(lambda d: d.execute_script(loaded) >= 4)
        WebDriverWait(driver, 30).until(lambda d: expected in d.find_element(By.TAG_NAME, "body").text)
        time.sleep(1)  # let the last thumbnails paint before the screenshot
        assert driver.save_screenshot(str(REPO / "docs" / "demo.png"))
    finally:
        driver.quit()
    assert (REPO / "docs" / "demo.png").stat().st_size > 10_000
