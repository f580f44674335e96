"""pipeline/contact_sheet.py on outputs laid out by pipeline/generation/manifest.py, locally and on S3 (moto)."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.contact_sheet import ContactSheetError, render_sheet, write_contact_sheet, write_sheet
from pipeline.generation import manifest


def fake_output(out: str, seeds: list[int], shard_size: int = 4) -> None:
    """An output as jobs.generate leaves it: a PNG per seed and one manifest part per shard.
    Seed s is a plate whose ink covers s/16 of its rows, so tiles can be told apart."""
    by_shard: dict[int, list[int]] = {}
    for seed in seeds:
        by_shard.setdefault(seed // shard_size, []).append(seed)
    for shard, shard_seeds in by_shard.items():
        cols: dict[str, list] = {name: [] for name in manifest.WORKER_COLUMNS}
        for seed in shard_seeds:
            image = np.full((32, 32), 255, np.uint8)
            image[: 2 * seed] = 0
            buf = io.BytesIO()
            Image.fromarray(image, mode="L").save(buf, format="PNG")
            path = manifest.image_path(shard, seed)
            storage.write_bytes(storage.join(out, path), buf.getvalue())
            for name, value in {
                "seed": seed, "shard": shard, "caption": f"an engraving number {seed} of a long caption " * 3,
                "image_path": path, "image_sha256": "0" * 64, "width": 32, "height": 32,
                "alignment": 0.5, "created_at": dt.datetime.now(dt.timezone.utc),
            }.items():  # fmt: skip
                cols[name].append(value)
        manifest.write_part(out, shard, cols, model_digest="d" * 64, run_id="test")


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "gen")
    request.getfixturevalue("s3_server")
    return f"s3://inkseed-test/contact-sheet-{uuid.uuid4().hex[:8]}"


def test_sheet_shows_the_smallest_seeds_in_order(out):
    fake_output(out, seeds=[9, 3, 0, 5, 1, 7, 2])
    target = write_contact_sheet(out, count=4, columns=2)
    assert target == storage.join(out, "contact_sheet.png")
    sheet = np.asarray(Image.open(io.BytesIO(storage.read_bytes(target))))
    tile, cell_w = 192, 192 + 16
    assert sheet.shape[1] == 2 * cell_w and sheet.shape[0] > 2 * tile
    cell_h = sheet.shape[0] // 2
    # Tiles in reading order are seeds 0, 1, 2, 3: seed s has its top 2*s/32 rows inked.
    inked = [
        (sheet[r * cell_h + 8 : r * cell_h + 8 + tile, c * cell_w + 8 + tile // 2] == 0).mean()
        for r in range(2)
        for c in range(2)
    ]
    np.testing.assert_allclose(inked, [2 * s / 32 for s in (0, 1, 2, 3)], atol=0.01)


def test_a_leftover_temp_part_is_ignored(tmp_path):
    out = str(tmp_path / "gen")
    fake_output(out, seeds=[0, 1])
    storage.write_bytes(storage.join(out, "manifest", "part-00000.parquet.tmp-1234abcd"), b"not parquet")
    assert storage.exists(write_contact_sheet(out))


def test_no_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ContactSheetError, match="no manifest"):
        write_contact_sheet(str(tmp_path / "empty"))


def test_long_captions_are_cut_to_the_tile():
    image = np.zeros((16, 16), np.uint8)
    short = np.asarray(render_sheet([image], ["seed 0"], ["a ship"], columns=1))
    long = np.asarray(render_sheet([image], ["seed 0"], ["word " * 200], columns=1))
    assert short.shape == long.shape  # the caption never grows the cell
    below = slice(192 + 8, None)
    assert (long[below] < 128).sum() > (short[below] < 128).sum()


def test_html_page_escapes_captions_and_embeds_the_exact_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    captions = ["a <b>bold</b> caption", "two", "three"]
    png, page = tmp_path / "s" / "sheet.png", tmp_path / "s" / "sheet.html"
    write_sheet(images, ["seed 7", "seed 8  align -0.25", "seed 9"], captions, str(png), str(page))
    assert Image.open(png).mode == "L"
    text = page.read_text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold</b>" not in text
    assert "<b>seed 8  align -0.25</b>" in text
    first = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(first)))), images[0])
    with pytest.raises(ContactSheetError, match="as many"):
        write_sheet(images, ["a", "b", "c"], captions[:2], str(png), str(page))
