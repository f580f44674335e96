"""The OpenMoji line-art source, on the real npm package (fetched by scripts/fetch_openmoji.sh
when $INKSEED_OPENMOJI and the cache have none)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import prepare_data
from pipeline import storage
from pipeline.data import openmoji
from pipeline.data.ingest import read_captions
from pipeline.data.sources import imagefolder_rows

REPO = Path(__file__).resolve().parents[3]
COUNT = 200
FIELDS = {"file_name", "text", "hexcode", "annotation", "group", "subgroup", "tags", "author"}


@pytest.fixture(scope="module")
def source(openmoji_source: Path) -> Path:
    return openmoji_source


@pytest.fixture(scope="module")
def rendered(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("openmoji") / "data"
    assert openmoji.render_openmoji(str(out), size=64, source=str(source), limit=COUNT) == COUNT
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_layout_and_metadata(rendered: Path) -> None:
    meta = rows(rendered)
    assert len(meta) == COUNT
    assert all(set(r) == FIELDS for r in meta)
    assert meta[0]["file_name"] == "images/1F600.png" and meta[0]["group"] == "smileys-emotion"
    assert len({r["file_name"] for r in meta}) == COUNT
    assert all(r["file_name"] == f"images/{r['hexcode']}.png" for r in meta)
    assert sorted(p.name for p in (rendered / "images").iterdir()) == sorted(
        Path(r["file_name"]).name for r in meta
    )
    assert all(
        isinstance(r["tags"], list) and r["tags"] and all(isinstance(t, str) for t in r["tags"]) for r in meta
    )
    assert all(r["annotation"] and r["subgroup"] for r in meta)
    sheet = Image.open(rendered / "contact_sheet.png")
    assert sheet.mode == "L" and sheet.width > 600 and sheet.height > 600  # 4 columns x 4 rows of tiles


def test_the_caption_rule(rendered: Path) -> None:
    for r in rows(rendered):
        assert r["text"] == openmoji.caption(r["annotation"])
        assert r["text"].startswith("a line drawing of ") and r["text"] == r["text"].lower()
        assert r["text"].endswith(
            r["annotation"].lower().replace("’", "'").replace("“", '"').replace("”", '"')
        )
    assert rows(rendered)[0]["text"] == "a line drawing of a grinning face"
    assert openmoji.caption("ATM sign") == "a line drawing of an atm sign"
    assert openmoji.caption("clapping hands") == "a line drawing of clapping hands"
    assert (
        openmoji.caption("grinning face with big eyes") == "a line drawing of a grinning face with big eyes"
    )
    assert openmoji.caption("octopus") == "a line drawing of an octopus"
    assert openmoji.caption("1st place medal") == "a line drawing of 1st place medal"
    assert openmoji.caption("men’s  room") == "a line drawing of a men's room"


def test_images_are_black_ink_on_white(rendered: Path) -> None:
    for r in rows(rendered):
        img = Image.open(rendered / r["file_name"])
        assert img.mode == "L" and img.size == (64, 64), r["file_name"]
        a = np.asarray(img)
        assert a.min() < 40, f"{r['file_name']}: no dark ink"
        assert 0.01 < (a < 128).mean() < 0.6, f"{r['file_name']}: blank or mostly black"
        assert np.median(a) == 255 and a[0, 0] == 255, f"{r['file_name']}: paper is not white"
        assert ((a > 0) & (a < 255)).any(), f"{r['file_name']}: not anti-aliased"


def test_skin_tones_collapse_and_duplicates_drop(source: Path) -> None:
    entries = json.loads((source / "data" / "openmoji.json").read_text(encoding="utf-8"))
    by_hex = {e["hexcode"]: e for e in entries}
    kept = openmoji.load_drawings(source)
    assert len(kept) == 2062  # openmoji 17.0.0: 4495 entries, 2465 without skin tone, less parts and repeats
    assert len({d.hexcode for d in kept}) == len(kept)
    assert not [d.hexcode for d in kept if by_hex[d.hexcode]["skintone"]]
    assert not [d.hexcode for d in kept if d.group == "component"]
    hexes = {d.hexcode for d in kept}
    assert "1F44B" in hexes and "1F44B-1F3FB" not in hexes  # waving hand, not its light skin tone
    svgs = [Path(d.svg).read_bytes() for d in kept]
    assert len(set(svgs)) == len(svgs)  # one caption per distinct black drawing
    assert sum(d.annotation.startswith("flag: ") for d in kept) <= 15  # not ~260 bare rectangles


def test_two_renders_give_the_same_bytes(rendered: Path, source: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    openmoji.render_openmoji(str(again), size=64, source=str(source), limit=COUNT)
    files = sorted(p.relative_to(rendered) for p in rendered.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((rendered / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_ingestion_reads_it(rendered: Path) -> None:
    table = imagefolder_rows(str(rendered), "all", 64, None, None)
    assert table.num_rows == COUNT and set(table.column("skip").to_pylist()) == {""}
    assert set(table.column("caption").to_pylist()) == {r["text"] for r in rows(rendered)}
    assert 0 < len(read_captions(str(rendered), "val")) < COUNT // 4


def test_missing_source_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"openmoji@17\.0\.0.*bash scripts/fetch_openmoji\.sh") as err:
        openmoji.find_source(str(tmp_path / "nowhere"))
    assert isinstance(err.value, openmoji.OpenMojiError) and "npm install --prefix" in str(err.value)
    monkeypatch.setenv("INKSEED_OPENMOJI", str(tmp_path / "nowhere"))
    with pytest.raises(openmoji.OpenMojiError, match="nowhere"):
        openmoji.render_openmoji(str(tmp_path / "out"), limit=1)
    assert not (tmp_path / "out").exists()


def test_missing_rasterizer_names_the_pypi_package(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules, "resvg_py", None
    )  # what `import resvg_py` meets when it is not installed
    with pytest.raises(openmoji.OpenMojiError, match="pip install resvg-py"):
        openmoji.render_openmoji(str(tmp_path / "out"), source=str(source), limit=1)


def test_render_to_s3(source: Path, rendered: Path, s3_server: str) -> None:
    uri = "s3://inkseed-test/openmoji-test"
    assert openmoji.render_openmoji(uri, size=64, source=str(source), limit=3) == 3
    assert storage.read_bytes(f"{uri}/images/1F600.png") == (rendered / "images" / "1F600.png").read_bytes()
    assert len(storage.read_bytes(f"{uri}/metadata.jsonl").decode().splitlines()) == 3


@pytest.mark.slow  # the job's command in a subprocess (the other tests render in-process)
def test_prepare_data_job(
    source: Path, rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "job"
    cmd = [
        sys.executable,
        "-m",
        "jobs.prepare_data",
        "--source",
        "openmoji",
        "--out",
        str(out),
        "--size",
        "64",
        "--count",
        "50",
    ]
    done = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "INKSEED_OPENMOJI": str(source)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 50 OpenMoji drawings" in done.stdout
    meta = rows(out)
    assert meta == rows(rendered)[:50]  # --count is the first N of the same order
    assert all((out / r["file_name"]).read_bytes() == (rendered / r["file_name"]).read_bytes() for r in meta)
    with pytest.raises(SystemExit):
        prepare_data.parse_args(["--source", "openmoji", "--openmoji-dir", str(tmp_path / "nowhere")])
    assert "openmoji@17.0.0" in capsys.readouterr().err
    assert prepare_data.parse_args(["--source", "openmoji", "--openmoji-dir", str(source)]).count is None
    assert prepare_data.parse_args([]).count == 20000 and prepare_data.parse_args([]).source == "procedural"


def test_png_decodes_like_the_rasterizer(rendered: Path, source: Path) -> None:
    png = (rendered / "images" / "1F600.png").read_bytes()
    svg = (source / "black" / "svg" / "1F600.svg").read_text(encoding="utf-8")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), openmoji.rasterize(svg, 64))
