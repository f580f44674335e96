"""Ingestion into Ray Data: both input formats, local and on S3 (moto), bad rows, image modes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data import engrave
from pipeline.data import ingest as data
from pipeline.data.grammar import ATTRIBUTES, parse_caption
from pipeline.data.ingest import (
    DatasetError,
    load_dataset,
    read_captions,
    read_dataset,
    split_of,
    to_model_gray,
)

SIZE = 32


@pytest.fixture(scope="module")
def engravings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engravings")
    engrave.render_dataset(str(out), count=40, size=64, seed=0)
    return out


def _metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _by_name(ds) -> dict[str, dict]:
    return {r["file_name"]: r for r in ds.take_all()}


def _expected(folder: Path) -> dict[str, np.ndarray]:
    """What ingestion must produce for each image of a rendered dataset."""
    return {
        m["file_name"]: to_model_gray(Image.open(folder / m["file_name"]), SIZE).astype(np.float32) / 127.5
        - 1
        for m in _metadata(folder)
    }


# ---------------------------------------------------------------- pure functions (no Ray)


def test_split_is_deterministic_ninety_ten() -> None:
    names = [f"images/{i:06d}.png" for i in range(5000)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]
    assert 0.08 < splits.count("val") / len(names) < 0.12
    assert split_of("images/000000.png") == split_of("images/000000.png")


def test_to_model_gray_modes_and_crop() -> None:
    white_rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))  # transparent black -> paper white
    assert (to_model_gray(white_rgba, SIZE) == 255).all()
    assert (to_model_gray(Image.new("LA", (40, 40), (0, 255)), SIZE) == 0).all()
    i16 = Image.fromarray(np.array([[0, 65535]] * 2, dtype=np.uint16)).resize((40, 40), Image.NEAREST)
    assert i16.mode.startswith("I")
    out = to_model_gray(i16, SIZE)
    assert out.min() == 0 and out.max() == 255
    pal = Image.new("P", (64, 48))
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, 32, 48))  # left half white
    out = to_model_gray(pal, SIZE)
    assert out.shape == (SIZE, SIZE) and out[:, :2].min() == 255 and out[:, -2:].max() == 0
    # Non-square: the shorter side is resized, the longer one center-cropped (no padding).
    wide = np.zeros((20, 60), dtype=np.uint8)
    wide[:, 20:40] = 255  # the central third
    out = to_model_gray(Image.fromarray(wide), SIZE)
    assert out.shape == (SIZE, SIZE) and out[:, 4:-4].mean() > 250
    rgb = Image.new("RGB", (10, 10), (255, 0, 0))
    assert to_model_gray(rgb, SIZE).shape == (SIZE, SIZE)


def test_to_model_gray_honours_exif_orientation() -> None:
    img = Image.new("L", (20, 10), 255)
    img.paste(0, (0, 0, 10, 10))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the black half goes on top
    loaded = Image.open(io.BytesIO(_png_with_exif(img, exif)))
    out = to_model_gray(loaded, SIZE)
    assert out[:12].max() < 10 and out[-12:].min() > 245


def _png_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def test_clean_caption() -> None:
    assert data.clean_caption("  a  ship\n", 10) == ("a ship", "")
    assert data.clean_caption(" \t ", 10) == ("", "empty_caption")
    assert data.clean_caption(None, 10) == ("", "empty_caption")
    assert data.clean_caption(b"caf\xe9", 10) == ("", "non_utf8")
    assert data.clean_caption("caf\udce9", 10) == ("", "non_utf8")
    assert data.clean_caption("one two three four", 2) == ("one two", "truncated")


# ---------------------------------------------------------------- image folder


def test_imagefolder_local(ray_local, engravings: Path, capsys: pytest.CaptureFixture) -> None:
    ds, stats = load_dataset(str(engravings), image_size=SIZE)
    rows = _by_name(ds)
    meta = {m["file_name"]: m for m in _metadata(engravings)}
    assert set(rows) == set(meta) and stats.rows_read == 40 and stats.skipped == {}
    for name, row in rows.items():
        assert row["image"].dtype == np.float32 and row["image"].shape == (SIZE, SIZE)
        assert -1.0 <= row["image"].min() < -0.3 and 0.7 < row["image"].max() <= 1.0  # ink and paper
        assert row["caption"] == meta[name]["text"]
        attrs = json.loads(row["attributes"])
        assert attrs == {k: meta[name][k] for k in ATTRIBUTES} == parse_caption(row["caption"])
    assert "40 rows read, 40 kept" in capsys.readouterr().out  # printed: the user sees the skip counts

    train = read_dataset(str(engravings), image_size=SIZE, split="train").take_all()
    val = read_dataset(str(engravings), image_size=SIZE, split="val").take_all()
    assert {r["file_name"] for r in train} | {r["file_name"] for r in val} == set(meta)
    assert all(split_of(r["file_name"]) == "val" for r in val) and len(train) + len(val) == 40


def test_tokens_from_a_tokenizer(ray_local, engravings: Path) -> None:
    from model.tokenizer import CaptionTokenizer

    captions = read_captions(str(engravings), split="train")
    assert 30 <= len(captions) < 40
    tok = CaptionTokenizer.train(captions)
    rows = read_dataset(str(engravings), image_size=SIZE, tokenizer=tok, max_caption_tokens=32).take(5)
    for row in rows:
        assert row["tokens"].dtype == np.int64 and row["tokens"].shape == (32,)
        assert row["tokens"][0] == tok.bos_id
        assert tok.decode(row["tokens"].tolist())[0] == tok.normalize(row["caption"])


def test_imagefolder_csv(ray_local, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png(Image.new("L", (40, 30), 0)))
    (tmp_path / "b.png").write_bytes(_png(Image.new("RGB", (30, 40), (255, 255, 255))))
    (tmp_path / "metadata.csv").write_text(
        'file_name,caption,source\na.png,"a black, square",x\nb.png,white,y\n'
    )
    rows = _by_name(read_dataset(str(tmp_path), image_size=SIZE))
    assert rows["a.png"]["caption"] == "a black, square" and (rows["a.png"]["image"] == -1).all()
    assert (rows["b.png"]["image"] == 1).all()
    assert json.loads(rows["b.png"]["attributes"]) == {"source": "y"}


# ---------------------------------------------------------------- Parquet


def _parquet_variants(folder: Path, engravings: Path) -> dict[str, Path]:
    """The same 12 samples as Parquet with bytes, HF {bytes, path} structs, and relative paths."""
    meta = _metadata(engravings)[:12]
    blobs = [(engravings / m["file_name"]).read_bytes() for m in meta]
    folder.mkdir(exist_ok=True)
    shutil.copytree(engravings / "images", folder / "images", dirs_exist_ok=True)
    tables = {
        "bytes.parquet": pa.table({"image": blobs, "caption": [m["text"] for m in meta],
                                   "file_name": [m["file_name"] for m in meta]}),
        "struct.parquet": pa.table({"image": [{"bytes": b, "path": m["file_name"]} for b, m in zip(blobs, meta)],
                                    "text": [m["text"] for m in meta]}),
        "paths.parquet": pa.table({"image_path": [m["file_name"] for m in meta], "text": [m["text"] for m in meta],
                                   "subject": [m["subject"] for m in meta]}),
    }  # fmt: skip
    for name, table in tables.items():
        pq.write_table(table, folder / name)
    return {name: folder / name for name in tables}


def test_parquet_bytes_structs_and_paths(ray_local, engravings: Path, tmp_path: Path) -> None:
    files = _parquet_variants(tmp_path / "pq", engravings)
    assert duckdb.sql(f"select count(*) from '{files['bytes.parquet']}'").fetchall()[0][0] == 12
    expected = _expected(engravings)
    captions = {m["file_name"]: m["text"] for m in _metadata(engravings)}
    for name, path in files.items():
        rows = _by_name(read_dataset(str(path), image_size=SIZE))
        assert len(rows) == 12, name
        for file_name, row in rows.items():
            assert np.array_equal(row["image"], expected[file_name]), name
            assert row["caption"] == captions[file_name]
        if name == "paths.parquet":  # extra columns become attributes
            assert all(json.loads(r["attributes"]).keys() == {"subject"} for r in rows.values())


def test_parquet_folder_and_caption_column_errors(ray_local, tmp_path: Path) -> None:
    folder = tmp_path / "pqdir"
    folder.mkdir()
    img = _png(Image.new("L", (8, 8), 128))
    for part in range(2):
        pq.write_table(pa.table({"image": [img] * 3, "text": [f"part {part} row {i}" for i in range(3)]}),
                       folder / f"part-{part}.parquet")  # fmt: skip
    rows = read_dataset(str(folder), image_size=SIZE).take_all()
    assert sorted(r["caption"] for r in rows) == [f"part {p} row {i}" for p in range(2) for i in range(3)]
    assert {r["file_name"] for r in rows} == {
        "sha1:" + hashlib.sha1(img).hexdigest()
    }  # no path: content hash
    pq.write_table(pa.table({"image": [img], "title": ["x"]}), tmp_path / "nocap.parquet")
    with pytest.raises(DatasetError, match="caption column 'text' or 'caption'.*title"):
        read_dataset(str(tmp_path / "nocap.parquet"), image_size=SIZE)
    with pytest.raises(DatasetError, match="caption column 'title2'"):
        read_dataset(str(folder), image_size=SIZE, caption_column="title2")


# ---------------------------------------------------------------- S3 (moto server)


@pytest.mark.slow  # both dataset formats read from S3 (moto)
def test_both_formats_from_s3(ray_local, s3_server: str, engravings: Path, tmp_path: Path) -> None:
    root = "s3://inkseed-test/data-test"
    fs, bucket_path = storage.filesystem(root)  # one client for all uploads

    def upload(local: Path, key: str) -> None:
        with fs.open_output_stream(f"{bucket_path}/{key}") as f:
            f.write(local.read_bytes())

    for path in engravings.rglob("*"):
        if path.is_file():
            upload(path, f"folder/{path.relative_to(engravings).as_posix()}")
    files = _parquet_variants(tmp_path / "pq", engravings)
    upload(files["bytes.parquet"], "pq/bytes.parquet")
    upload(files["paths.parquet"], "pq/paths.parquet")
    for path in (tmp_path / "pq" / "images").iterdir():
        upload(path, f"pq/images/{path.name}")

    expected = _expected(engravings)
    folder_rows = _by_name(read_dataset(f"{root}/folder", image_size=SIZE))
    assert folder_rows.keys() == expected.keys()
    assert all(np.array_equal(r["image"], expected[n]) for n, r in folder_rows.items())
    for uri in (f"{root}/pq/bytes.parquet", f"{root}/pq/paths.parquet"):
        rows = _by_name(read_dataset(uri, image_size=SIZE))
        assert len(rows) == 12, uri
        assert all(np.array_equal(r["image"], expected[n]) for n, r in rows.items())
    assert len(read_captions(f"{root}/folder", split="all")) == 40
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(f"{root}/nothing-here", image_size=SIZE)


# ---------------------------------------------------------------- bad rows and modes


def _salted(folder: Path, engravings: Path) -> None:
    """40 good engravings plus 3 odd-mode images (kept), 1 long caption (kept, truncated) and
    7 bad rows: corrupt, truncated, missing file, empty and blank captions, non-UTF-8, bad JSON."""
    shutil.copytree(engravings, folder)
    lines = (folder / "metadata.jsonl").read_bytes().splitlines()
    good_png = (engravings / "images" / "000000.png").read_bytes()
    rgba = Image.new("RGBA", (70, 50), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 35, 50))
    pal = Image.new("P", (50, 50))
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    i16 = Image.fromarray(np.full((50, 60), 40000, dtype=np.uint16))
    files = {
        "rgba.png": _png(rgba), "pal.png": _png(pal), "i16.png": _png(i16),
        "long.png": good_png, "corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
        "truncated.png": good_png[: len(good_png) // 2],
        "empty.png": good_png, "blank.png": good_png, "latin1.png": good_png,
    }  # fmt: skip
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    extra = [
        json.dumps({"file_name": "rgba.png", "text": "half black rgba"}).encode(),
        json.dumps({"file_name": "pal.png", "text": "palette"}).encode(),
        json.dumps({"file_name": "i16.png", "text": "sixteen bit"}).encode(),
        json.dumps({"file_name": "long.png", "text": " ".join(["word"] * 100)}).encode(),
        json.dumps({"file_name": "corrupt.png", "text": "corrupt"}).encode(),
        json.dumps({"file_name": "truncated.png", "text": "truncated"}).encode(),
        json.dumps({"file_name": "missing.png", "text": "missing"}).encode(),
        json.dumps({"file_name": "empty.png", "text": ""}).encode(),
        json.dumps({"file_name": "blank.png", "text": "  \t "}).encode(),
        b'{"file_name": "latin1.png", "text": "caf\xe9"}',
        b'{"file_name": "broken.png", "text": ',
    ]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines + extra) + b"\n")


def test_salted_dataset_skip_counts_and_modes(ray_local, engravings: Path, tmp_path: Path) -> None:
    folder = tmp_path / "salted"
    _salted(folder, engravings)
    ds, stats = load_dataset(str(folder), image_size=SIZE, max_caption_tokens=32, max_bad_fraction=0.2)
    assert stats.rows_read == 51
    assert stats.skipped == {
        "unreadable_image": 2, "missing_file": 1, "empty_caption": 2, "non_utf8": 1, "bad_metadata": 1,
    }  # fmt: skip
    assert stats.truncated == 1 and stats.rows_kept == 44
    rows = _by_name(ds)
    assert len(rows) == 44
    assert rows["long.png"]["caption"] == " ".join(["word"] * 30)
    rgba = rows["rgba.png"]["image"]  # black left half, transparent (-> white) right half
    assert (rgba[:, : SIZE // 2 - 3] < -0.97).all() and (rgba[:, SIZE // 2 + 3 :] > 0.97).all()
    assert (rows["pal.png"]["image"] == -1).all()
    assert np.allclose(rows["i16.png"]["image"], round(40000 / 257) / 127.5 - 1)

    with pytest.raises(DatasetError, match=r"13\.7% of rows are bad.*max_bad_fraction=5\.0%"):
        read_dataset(str(folder), image_size=SIZE)


def test_missing_and_empty_datasets(ray_local, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        read_dataset(str(tmp_path / "nowhere"), image_size=SIZE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(DatasetError, match="no caption column"):
        read_dataset(str(tmp_path / "empty"), image_size=SIZE)
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "x"}\n')
    (tmp_path / "empty" / "x.png").write_bytes(_png(Image.new("L", (8, 8))))
    name_val = split_of("x.png")
    other = "train" if name_val == "val" else "val"
    with pytest.raises(DatasetError, match=f"has no rows in split '{other}'"):
        read_dataset(str(tmp_path / "empty"), image_size=SIZE, split=other)
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="no metadata.jsonl, metadata.csv or \\*.parquet"):
        read_dataset(str(tmp_path / "other"), image_size=SIZE)
