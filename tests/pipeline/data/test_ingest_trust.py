"""Ingestion of untrusted datasets (issue 15): paths outside the dataset, devices and FIFOs, size
caps, high bit depths, metadata quirks (BOM, U+2028, extra CSV fields, duplicates), mistyped
Parquet columns, special-token captions. Real local Ray, moto for s3://."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.ingest import DatasetError, load_dataset, read_captions, read_options, to_model_gray

SIZE = 16


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(folder: Path, rows: list[dict], prefix: bytes = b"") -> None:
    (folder / "metadata.jsonl").write_bytes(prefix + "\n".join(json.dumps(r) for r in rows).encode() + b"\n")


def _names(ds) -> dict[str, dict]:
    return {r["file_name"]: r for r in ds.take_all()}


# ---------------------------------------------------------------- paths and reads


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A dataset whose rows point outside it, at a device, a FIFO, a too-big file and a too-big
    image, beside two good rows."""
    root = tmp_path / "ds"
    root.mkdir()
    gray = _png(Image.new("L", (8, 8), 100))
    (root / "good.png").write_bytes(gray)
    (root / "good2.png").write_bytes(gray)
    (tmp_path / "secret.png").write_bytes(gray)  # a readable image outside the dataset
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.png")
    (root / "big.png").write_bytes(gray + b"\0" * 5000)  # valid PNG, then padding: 5 KB+
    (root / "wide.png").write_bytes(_png(Image.new("L", (300, 300), 0)))  # 90,000 px
    names = ["good.png", "good2.png", "../secret.png", str(tmp_path / "secret.png"), "link.png", "zero.png",
             "fifo.png", "big.png", "wide.png", "s3://another-bucket/secret.png"]  # fmt: skip
    _jsonl(root, [{"file_name": n, "text": f"row {i}"} for i, n in enumerate(names)])
    return root


def test_paths_outside_the_dataset_devices_and_fifos_are_skipped(ray_local, hostile: Path) -> None:
    ds, stats = load_dataset(
        str(hostile), image_size=SIZE, max_bad_fraction=1.0, max_image_bytes=4000, max_image_pixels=50_000
    )
    assert stats.skipped == {"bad_path": 6, "too_large": 2}  # outside x3, link, /dev/zero, FIFO; big, wide
    assert set(_names(ds)) == {"good.png", "good2.png"}
    assert "bad_path=6" in stats.summary(str(hostile)) and "too_large=2" in stats.summary(str(hostile))
    # Captions are read without the images: the rows refused for their path are left out.
    assert read_captions(str(hostile), split="all") == ["row 0", "row 1", "row 6", "row 7", "row 8"]


def test_allow_external_paths_reads_outside_but_never_a_device(ray_local, hostile: Path) -> None:
    ds, stats = load_dataset(str(hostile), image_size=SIZE, max_bad_fraction=1.0, allow_external_paths=True)
    # Outside files are read now; /dev/zero and the FIFO are still not regular files; the
    # relative "../secret.png" is read too; s3://another-bucket has no such bucket here (read_error
    # or missing) and is not counted as kept.
    kept = set(_names(ds))
    assert {"good.png", "../secret.png", "link.png", "big.png", "wide.png"} <= kept
    assert stats.skipped["bad_path"] == 2 and "zero.png" not in kept and "fifo.png" not in kept


def test_size_caps_default_to_a_sane_bound(ray_local, tmp_path: Path) -> None:
    """81 Mpx (a 1-bit PNG of a few KB) is refused undecoded with the default pixel cap, which is
    below Pillow's own warning threshold (89 Mpx)."""
    Image.new("1", (9000, 9000), 1).save(tmp_path / "huge.png")
    (tmp_path / "ok.png").write_bytes(_png(Image.new("L", (8, 8), 255)))
    _jsonl(tmp_path, [{"file_name": "huge.png", "text": "huge"}, {"file_name": "ok.png", "text": "ok"}])
    ds, stats = load_dataset(str(tmp_path), image_size=SIZE, max_bad_fraction=1.0)
    assert stats.skipped == {"too_large": 1} and list(_names(ds)) == ["ok.png"]
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        load_dataset(str(tmp_path), image_size=SIZE, max_image_pixels=0)


def test_an_s3_dataset_reads_only_its_own_prefix(ray_local, s3_server: str) -> None:
    root = "s3://inkseed-test/trust/ds"
    gray = _png(Image.new("L", (8, 8), 50))
    for key in ("trust/ds/a.png", "trust/private/secret.png"):
        storage.write_bytes(f"s3://inkseed-test/{key}", gray)
    rows = ["a.png", "../private/secret.png", "s3://inkseed-test/trust/private/secret.png", "/etc/hostname"]
    storage.write_bytes(f"{root}/metadata.jsonl", "\n".join(json.dumps({"file_name": n, "text": "x"}) for n in rows).encode())
    ds, stats = load_dataset(root, image_size=SIZE, max_bad_fraction=1.0)
    assert stats.skipped == {"bad_path": 3} and list(_names(ds)) == ["a.png"]
    _, stats = load_dataset(root, image_size=SIZE, max_bad_fraction=1.0, allow_external_paths=True)
    # The private object is read both ways; /etc/hostname (a file of the job's own machine) is read
    # too, and is no image.
    assert stats.rows_kept == 3 and stats.skipped == {"unreadable_image": 1}


# ---------------------------------------------------------------- bit depths


def test_sixteen_bit_and_float_images_scale_by_their_mode_range() -> None:
    dark16 = Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16))  # max 1000 of 65535: nearly black
    assert dark16.mode == "I;16" and (to_model_gray(dark16, 8) == 4).all()  # round(1000 / 257)
    ramp16 = Image.fromarray(np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16))
    assert to_model_gray(ramp16, 4)[0].tolist() == [0, 1, 128, 255]
    as_i = Image.fromarray(np.full((8, 8), 1000, dtype=np.int32))  # Pillow's "I": read as 16-bit data
    assert as_i.mode == "I" and (to_model_gray(as_i, 8) == 4).all()
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0, 2.0]] * 4, dtype=np.float32))  # 0..1, clipped
    assert floats.mode == "F" and to_model_gray(floats, 4)[0].tolist() == [0, 64, 255, 255]
    nan = Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32))
    assert (to_model_gray(nan, 4) == 0).all()


def test_a_float_tiff_is_not_black_after_ingestion(ray_local, tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "f.tiff")
    _jsonl(tmp_path, [{"file_name": "f.tiff", "text": "mid gray"}])
    row = load_dataset(str(tmp_path), image_size=SIZE)[0].take_all()[0]
    assert np.allclose(row["image"], 128 / 127.5 - 1, atol=1e-6)  # 0.5 -> 128 of 255, not black


# ---------------------------------------------------------------- metadata


def test_bom_u2028_duplicates_and_non_string_captions(ray_local, tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / name).write_bytes(_png(Image.new("L", (8, 8), 200)))
    rows = [
        {"file_name": "a.png", "text": "first\u2028line"},  # the first row, right after the BOM
        {"file_name": "b.png", "text": "a ship\u2029at sea"},
        {"file_name": "a.png", "text": "the same file again"},
        {"file_name": "c.png", "text": 7},
        {"file_name": "d.png", "text": None},
    ]
    _jsonl(tmp_path, rows, prefix="\ufeff".encode())
    ds, stats = load_dataset(str(tmp_path), image_size=SIZE, max_bad_fraction=1.0)
    assert stats.rows_read == 5  # U+2028 / U+2029 split no line; the BOM spoils no row
    assert stats.skipped == {"duplicate": 1, "bad_metadata": 1, "empty_caption": 1}
    kept = _names(ds)  # the separators are whitespace inside the caption
    assert kept["a.png"]["caption"] == "first line" and kept["b.png"]["caption"] == "a ship at sea"
    assert sorted(read_captions(str(tmp_path), split="all")) == ["a ship at sea", "first line"]


def test_csv_with_a_bom_and_rows_with_extra_fields(ray_local, tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(_png(Image.new("L", (8, 8), 0)))
    (tmp_path / "metadata.csv").write_bytes(
        "\ufefffile_name,text,source\na.png,a ship,x\nb.png,a black, square,y\nc.png,\"a tree, tall\",z\n".encode()
    )
    ds, stats = load_dataset(str(tmp_path), image_size=SIZE, max_bad_fraction=1.0)
    assert stats.skipped == {"bad_metadata": 1}  # b.png's row has 4 fields for 3 columns
    kept = _names(ds)
    assert set(kept) == {"a.png", "c.png"} and kept["c.png"]["caption"] == "a tree, tall"
    assert json.loads(kept["a.png"]["attributes"]) == {"source": "x"}
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\na.png," + b"x" * 200_000 + b"\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv: line \d+ is not valid CSV"):
        load_dataset(str(tmp_path), image_size=SIZE)


# ---------------------------------------------------------------- Parquet


def test_parquet_duplicates_keep_the_first_row_in_file_order(ray_local, tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    img = _png(Image.new("L", (8, 8), 30))
    names = [f"img-{i}.png" for i in range(300)]  # more than one Ray block per file
    pq.write_table(pa.table({"image": [img] * 300, "text": [f"first {i}" for i in range(300)], "file_name": names}),
                   folder / "part-0.parquet")  # fmt: skip
    pq.write_table(pa.table({"image": [img] * 3, "text": ["second 0", "second 1", "new"],
                             "file_name": ["img-0.png", "img-299.png", "img-new.png"]}), folder / "part-1.parquet")  # fmt: skip
    ds, stats = load_dataset(str(folder), image_size=SIZE, max_bad_fraction=0.5)
    assert stats.rows_read == 303 and stats.skipped == {"duplicate": 2}
    kept = _names(ds)
    assert len(kept) == 301 and kept["img-0.png"]["caption"] == "first 0" and kept["img-299.png"]["caption"] == "first 299"
    assert len(read_captions(str(folder), split="all")) == 301
    # Rows named by their bytes' hash (no file names) are several captions of one image, not duplicates.
    pq.write_table(pa.table({"image": [img] * 2, "text": ["one", "two"]}), tmp_path / "nonames.parquet")
    assert load_dataset(str(tmp_path / "nonames.parquet"), image_size=SIZE)[1].skipped == {}


def test_mistyped_parquet_columns_are_named(ray_local, tmp_path: Path) -> None:
    img = _png(Image.new("L", (8, 8), 30))
    pq.write_table(pa.table({"image": [img], "text": [5]}), tmp_path / "intcap.parquet")
    with pytest.raises(DatasetError, match=r"caption column 'text' has type int64; captions must be strings"):
        load_dataset(str(tmp_path / "intcap.parquet"), image_size=SIZE)
    as_text = img.decode("latin-1")  # image bytes stored in a string column
    pq.write_table(pa.table({"image": [as_text], "text": ["x"]}), tmp_path / "strbytes.parquet")
    with pytest.raises(DatasetError, match=r"column 'image' is a string column that holds binary data"):
        load_dataset(str(tmp_path / "strbytes.parquet"), image_size=SIZE)
    struct = pa.array([{"bytes": as_text, "path": "a.png"}])
    pq.write_table(pa.table({"image": struct, "text": ["x"]}), tmp_path / "strstruct.parquet")
    with pytest.raises(DatasetError, match=r"column 'image' stores its image bytes as string; write them as binary"):
        load_dataset(str(tmp_path / "strstruct.parquet"), image_size=SIZE)


def test_parquet_path_columns_are_confined_too(ray_local, tmp_path: Path) -> None:
    (tmp_path / "outside.png").write_bytes(_png(Image.new("L", (8, 8), 0)))
    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "in.png").write_bytes(_png(Image.new("L", (8, 8), 0)))
    paths = ["in.png", "../outside.png", str(tmp_path / "outside.png"), "/dev/zero"]
    pq.write_table(pa.table({"image_path": paths, "text": ["x"] * 4}), folder / "rows.parquet")
    ds, stats = load_dataset(str(folder), image_size=SIZE, max_bad_fraction=1.0)
    assert stats.skipped == {"bad_path": 3} and list(_names(ds)) == ["in.png"]


# ---------------------------------------------------------------- captions, job configs


def test_special_token_spellings_in_captions_stay_text(ray_local, tmp_path: Path) -> None:
    from model.tokenizer import CaptionTokenizer

    (tmp_path / "a.png").write_bytes(_png(Image.new("L", (8, 8), 0)))
    _jsonl(tmp_path, [{"file_name": "a.png", "text": "a ship [EOS] at [PAD] sea"}])
    tok = CaptionTokenizer.train(read_captions(str(tmp_path), split="all"))
    row = load_dataset(str(tmp_path), image_size=SIZE, tokenizer=tok, max_caption_tokens=16)[0].take_all()[0]
    tokens = row["tokens"].tolist()
    assert tokens.count(tok.eos_id) == 1 and tokens.index(tok.eos_id) == 1 + 10  # 10 pieces, then eos
    assert tokens[: tokens.index(tok.eos_id)].count(tok.pad_id) == 0
    assert tok.decode([tokens])[0] == "a ship [ eos ] at [ pad ] sea"


def test_jobs_pass_their_limits_to_ingestion() -> None:
    from pipeline.evaluation.config import EvaluateConfig
    from pipeline.training.config import TrainConfig

    assert read_options(TrainConfig(allow_external_paths=True, max_image_bytes=10))["max_image_bytes"] == 10
    assert read_options(EvaluateConfig())["allow_external_paths"] is False
    with pytest.raises(ValueError, match="TrainConfig.max_image_pixels must be >= 1"):
        TrainConfig(max_image_pixels=0)
