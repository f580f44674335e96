"""The procedural engraving renderer and the prepare_data job."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import prepare_data
from pipeline import storage
from pipeline.data import engrave
from pipeline.data.grammar import ATTRIBUTES, all_scenes, is_valid_scene, parse_caption

BASE = {
    "subject": "house",
    "setting": "field",
    "sky": "clouds",
    "time": "dusk",
    "position": "center",
    "birds": "2",
}


def _render(attrs: dict[str, str], size: int = 64, seed: int = 0) -> np.ndarray:
    return engrave.render(attrs, size, random.Random(seed))


def test_render_is_deterministic_and_ink_on_paper() -> None:
    a, b = _render(BASE, 128), _render(BASE, 128)
    assert a.dtype == np.uint8 and a.shape == (128, 128)
    assert np.array_equal(a, b)
    assert 230 <= np.median(a[:, :3]) <= 250  # paper margin
    assert (a < 80).mean() > 0.1  # plenty of ink
    assert not np.array_equal(a, _render(BASE, 128, seed=1))  # the rng only jitters...
    assert np.abs(a.astype(int) - _render(BASE, 128, seed=1)).mean() < 60  # ...a little


@pytest.mark.parametrize("size", [64, 96, 128, 200, 512])
def test_render_sizes(size: int) -> None:
    img = _render(BASE, size)
    assert img.shape == (size, size)


@pytest.mark.parametrize("size", [63, 513, 0, 128.0])
def test_render_rejects_bad_size(size) -> None:
    with pytest.raises(ValueError, match="64 to 512"):
        engrave.render(BASE, size, random.Random(0))


def test_render_rejects_invalid_scene() -> None:
    with pytest.raises(ValueError, match="not a valid scene"):
        _render({**BASE, "subject": "ship"})  # ships only sail on the sea


def test_every_attribute_value_changes_the_picture() -> None:
    """Changing any one attribute (others fixed) changes a sizeable part of the plate."""
    scenes = all_scenes()
    for name in ATTRIBUTES:
        for scene in scenes[::97]:
            for value in ATTRIBUTES[name]:
                other = {**scene, name: value}
                if value == scene[name] or not is_valid_scene(other):
                    continue
                diff = np.abs(_render(scene).astype(int) - _render(other).astype(int)) > 60
                assert diff.mean() > 0.004, (scene, name, value)


def test_time_of_day_darkens_the_sky() -> None:
    sky = {t: _render({**BASE, "sky": "none", "time": t, "birds": "0"}, 128)[10:60, 10:118].mean()
           for t in ("day", "dusk", "night")}  # fmt: skip
    assert sky["day"] > sky["dusk"] + 30 > sky["night"] + 60


def test_position_moves_the_subject() -> None:
    """The subject's ink mass sits left of, at, or right of the centre, as the caption says."""
    xs = {}
    for pos in ("left", "center", "right"):
        scene = {**BASE, "sky": "none", "time": "day", "birds": "0", "position": pos, "subject": "tower"}
        ink = 255 - _render(scene, 128)[20:70, 10:118].astype(float)  # inside the border, sky only
        xs[pos] = 10 + (ink.sum(0) * np.arange(108)).sum() / ink.sum()
    assert xs["left"] < 54 < xs["center"] < 74 < xs["right"]


def test_hatching_is_line_work_not_flat_gray() -> None:
    """A night sky is cross-hatching: dark lines with paper between, no mid-gray fill."""
    img = _render({**BASE, "sky": "none", "time": "night", "birds": "0"}, 128)
    sky = img[12:50, 12:116]
    assert (sky < 100).mean() > 0.4 and (sky > 200).mean() > 0.05


def test_render_dataset_is_deterministic_and_count_independent(tmp_path: Path) -> None:
    engrave.render_dataset(str(tmp_path / "a"), count=6, size=64, seed=5)
    engrave.render_dataset(str(tmp_path / "b"), count=6, size=64, seed=5, workers=2)
    engrave.render_dataset(str(tmp_path / "c"), count=3, size=64, seed=5)
    for name in ["metadata.jsonl", "contact_sheet.png", *(f"images/{i:06d}.png" for i in range(6))]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for i in range(3):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    engrave.render_dataset(str(tmp_path / "d"), count=6, size=64, seed=6)
    assert (tmp_path / "a" / "metadata.jsonl").read_bytes() != (
        tmp_path / "d" / "metadata.jsonl"
    ).read_bytes()


def test_render_dataset_layout_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    engrave.render_dataset(str(out), count=20, size=64, seed=0)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"images/{i:06d}.png" for i in range(20)]
    for r in rows:
        attrs = {k: r[k] for k in ATTRIBUTES}
        assert parse_caption(r["text"]) == attrs
        img = Image.open(out / r["file_name"])
        assert img.mode == "L" and img.size == (64, 64)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 4 * 192 and sheet.size[1] > 4 * 192  # 16 tiles of 192 px, 4 per row


def test_render_dataset_to_s3(s3_server: str) -> None:
    uri = "s3://inkseed-test/engrave-test"
    engrave.render_dataset(uri, count=4, size=64, seed=0)
    lines = storage.read_bytes(f"{uri}/metadata.jsonl").decode().splitlines()
    assert len(lines) == 4
    png = storage.read_bytes(f"{uri}/images/000003.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), engrave.make_sample(0, 3, 64)[2])
    assert storage.exists(f"{uri}/contact_sheet.png")


def test_prepare_data_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "job")
    cfg = prepare_data.parse_args(
        ["--out", out, "--count", "5", "--size", "64", "--seed", "1", "--workers", "1"]
    )
    prepare_data.main(cfg)
    assert len((tmp_path / "job" / "metadata.jsonl").read_text().splitlines()) == 5
    assert "contact_sheet.png" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_data.parse_args(["--size", "1024"])
    assert "64 to 512" in capsys.readouterr().err
