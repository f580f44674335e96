"""jobs.generate --format files | webdataset | parquet (pipeline/generation/formats.py) on a real
local Ray with a tiny checkpoint: each format read back with its ecosystem's own reader (the
webdataset package and tarfile; Hugging Face datasets and DuckDB), locally and on S3 (moto);
resume and --verify / --repair of tar shards and embedded images; the format in the run's
identity; OUT/stats.json against the manifest; the contact sheet of every format."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path

import datasets
import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from model.checkpoint import save_checkpoint
from pipeline import storage
from pipeline.generation import manifest
from pipeline.generation.config import GenerateConfig, GenerateError
from pipeline.generation.formats import JSON_COLUMNS
from pipeline.generation.run import run_generation
from pipeline.generation.stats import QUANTILES
from pipeline.generation.verify import verify_output

from builders import scrambled_tiny

# The page whose "## The output formats" section holds the format snippets (it was README.md's).
README = Path(__file__).resolve().parents[3] / "docs" / "outputs.md"
CAPTIONS = [
    "an engraving of a windmill on the hills, on the left, by day",
    "a print of a sailing ship at sea, at dusk, with three birds",
]
# 24 seeds in 3 shards of 8; 3 DDIM steps of the tiny preset: a run is a few seconds.
SMALL = {"num_seeds": 24, "shard_size": 8, "batch_size": 8, "steps": 3, "max_actors": 1, "num_cpus": 0.5}
SEEDS = list(range(24))
# What a parquet-format OUT holds: no images/ and no shards/, the PNGs are inside the parts.
PARQUET_OUTPUT = ["contact_sheet.html", "contact_sheet.png", "manifest", "run.json", "stats.json"]
WORD = r"[\p{L}\p{N}'']+"  # stats.py's words, in DuckDB's SQL quoting


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, *scrambled_tiny(CAPTIONS, seed=0))
    return str(path)


def cfg_for(ckpt: str, out: Path | str, fmt: str, **change) -> GenerateConfig:
    return GenerateConfig(checkpoint=ckpt, output=str(out), format=fmt, **{**SMALL, **change})


@pytest.fixture(scope="module")
def runs(ckpt, ray_local, tmp_path_factory) -> dict[str, Path]:
    """One complete local output per format (the same seeds); tests read them or damage copies."""
    outs = {}
    for fmt in manifest.FORMATS:
        outs[fmt] = tmp_path_factory.mktemp(fmt) / "out"
        run_generation(cfg_for(ckpt, outs[fmt], fmt))
    return outs


def copy_of(runs: dict[str, Path], fmt: str, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(runs[fmt], out)
    return out


def manifest_table(out: str | Path) -> pa.Table:
    """The whole manifest, sorted by seed, read with pyarrow (local or s3://)."""
    fs, root = storage.filesystem(str(out))
    return pq.read_table(f"{root}/manifest", filesystem=fs).sort_by("seed")


def rows_of(out: str | Path) -> list[dict]:
    return manifest_table(out).to_pylist()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.iterdir()}


def check_webdataset(out: str, rows: list[dict]) -> None:
    """Read the shards with webdataset.WebDataset and with tarfile: every seed once, each PNG's
    sha256 that of the manifest, at the offset and size the manifest gives, members of fixed headers."""
    urls = [str(uri) for uri in manifest.tar_shards(out).values()]
    assert len(urls) == 3
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert sorted(int(s["__key__"]) for s in samples) == SEEDS
    by_seed = {int(s["__key__"]): s for s in samples}
    for row in rows:
        sample = by_seed[row["seed"]]
        assert sha(sample["png"]) == row["image_sha256"]
        assert sample["txt"].decode() == row["caption"]
        assert json.loads(sample["json"]) == {
            **{k: row[k] for k in JSON_COLUMNS},
            "model_digest": row["model_digest"],
        }
    for shard in range(3):
        data = storage.read_bytes(manifest.tar_uri(out, shard))
        shard_rows = [r for r in rows if r["shard"] == shard]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert tar.getnames() == [
                f"{r['seed']}.{ext}" for r in shard_rows for ext in ("png", "txt", "json")
            ]
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {
                (0, 0, 0, "", "", 0o644)
            }
            for row in shard_rows:
                member = tar.getmember(f"{row['seed']}.png")
                assert (member.offset_data, member.size) == (row["tar_offset"], row["tar_size"])
                assert (
                    tar.extractfile(member).read()
                    == data[row["tar_offset"] : row["tar_offset"] + row["tar_size"]]
                )
                assert (
                    sha(data[row["tar_offset"] : row["tar_offset"] + row["tar_size"]]) == row["image_sha256"]
                )
                assert row["image_path"] == f"shards/{shard:05d}.tar#{row['seed']}.png"


def check_parquet(out: str, cache: Path) -> None:
    """Read the parts with datasets.load_dataset("parquet") and DuckDB: every seed once, PIL images
    from the Image feature, each embedded PNG's sha256 that of the manifest."""
    parts = list(manifest.part_shards(out).values())
    ds = datasets.load_dataset("parquet", data_files=parts, split="train", cache_dir=str(cache))
    assert isinstance(ds.features["image"], datasets.Image)
    assert sorted(ds["seed"]) == SEEDS
    for sample in ds:
        assert isinstance(sample["image"], Image.Image) and sample["image"].size == (64, 64)
    for sample in ds.cast_column("image", datasets.Image(decode=False)):
        assert sha(sample["image"]["bytes"]) == sample["image_sha256"]
        assert sample["image"]["path"] == f"{sample['seed']}.png"
        assert sample["image_path"] == f"manifest/part-{sample['shard']:05d}.parquet#{sample['seed']}.png"
    # DuckDB reads local parts by glob; S3 parts (no httpfs offline) through the pyarrow table.
    source = f"'{out}/manifest/*.parquet'" if not storage.is_s3(out) else "s3_parts"
    s3_parts = manifest_table(out)  # noqa: F841  (DuckDB finds it by name)
    query = f"SELECT count(*), count(DISTINCT seed), count(*) FILTER (sha256(image.bytes) = image_sha256) FROM {source}"
    assert duckdb.sql(query).fetchall() == [(24, 24, 24)]


def test_webdataset_reads_back_with_webdataset_and_tarfile(runs):
    out = str(runs["webdataset"])
    check_webdataset(out, rows_of(out))
    assert not (runs["webdataset"] / "images").exists(), "no file per seed"


def test_parquet_reads_back_with_datasets_and_duckdb(runs, tmp_path):
    out = str(runs["parquet"])
    check_parquet(out, tmp_path / "hf")
    assert sorted(os.listdir(out)) == PARQUET_OUTPUT
    assert pq.read_schema(Path(out, "manifest", "part-00000.parquet")).metadata[b"huggingface"]


def test_every_format_holds_the_same_samples_and_contact_sheet(runs):
    """Same seeds, same checkpoint: the same PNG bytes and captions whatever the format, so the
    contact sheet each run wrote (from its own images: files, tar members, embedded bytes) is equal."""
    content = {
        fmt: [(r["seed"], r["caption"], r["image_sha256"], r["alignment"]) for r in rows_of(out)]
        for fmt, out in runs.items()
    }
    assert content["webdataset"] == content["files"] == content["parquet"]
    sheets = {fmt: (out / "contact_sheet.png").read_bytes() for fmt, out in runs.items()}
    assert sheets["webdataset"] == sheets["files"] == sheets["parquet"]
    assert Image.open(io.BytesIO(sheets["files"])).width == 4 * (192 + 16), "16 tiles, 4 columns"


@pytest.mark.parametrize("fmt", manifest.FORMATS)
def test_stats_json_matches_the_manifest(runs, fmt):
    out = runs[fmt]
    stats = json.loads((out / "stats.json").read_text())
    parts = f"'{out}/manifest/*.parquet'"
    assert stats["run_id"] == json.loads((out / "run.json").read_text())["run_id"] and stats["format"] == fmt
    assert stats["counts"] == {"seeds": 24, "shards": 3, "manifest_rows": 24, "generated_seeds": 24,
                               "generated_shards": 3, "skipped_shards": 0}  # fmt: skip
    assert stats["failures"] == {"duplicate_rows": 0, "unusable_shards": 0, "repaired_shards": 0}
    seconds = stats["seconds"]
    stages = ("setup", "generation", "validation", "contact_sheet")
    assert seconds["wall"] == pytest.approx(sum(seconds[s] for s in stages), abs=0.01)
    assert seconds["actor_model"] > 0 and seconds["actor_encode"] > 0 and seconds["driver_write"] > 0
    assert stats["seeds_per_s"] == pytest.approx(24 / seconds["generation"], rel=0.01)

    [(quantiles,)] = duckdb.sql(
        f"SELECT quantile_cont(alignment, {list(QUANTILES.values())}) FROM {parts}"
    ).fetchall()
    assert [stats["alignment"][k] for k in QUANTILES] == pytest.approx(quantiles, abs=1e-6)
    words = f"(SELECT regexp_extract_all(lower(caption), '{WORD}') AS w FROM {parts})"
    lengths = duckdb.sql(f"SELECT len(w) AS n, count(*) FROM {words} GROUP BY n ORDER BY n").fetchall()
    assert stats["captions"]["words_histogram"] == {str(n): c for n, c in lengths}
    assert sum(stats["captions"]["words_histogram"].values()) == 24
    top = duckdb.sql(
        f"SELECT word, count(*) AS n FROM (SELECT unnest(w) AS word FROM {words}) "
        "GROUP BY word ORDER BY n DESC, word ASC LIMIT 50"
    ).fetchall()
    assert list(stats["captions"]["top_words"].items()) == top and top


@pytest.mark.slow  # fault injection: a lost tar and a lost part, regenerated by reruns
def test_webdataset_resume_regenerates_a_lost_tar_and_a_lost_part(runs, ckpt, tmp_path, capsys):
    """Shard 1 loses its tar, shard 2 its part; a kill left a temp tar. The rerun regenerates both
    shards byte for byte, leaves shard 0 alone, and its stats cover every seed."""
    out = copy_of(runs, "webdataset", tmp_path)
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    untouched = inodes(out / "shards")["00000.tar"], inodes(out / "manifest")["part-00000.parquet"]
    (out / "shards" / "00001.tar").unlink()
    (out / "manifest" / "part-00002.parquet").unlink()
    (out / "shards" / ".00001.tar.0123456789ab.tmp").write_bytes(b"left by a kill")
    summary = run_generation(cfg_for(ckpt, out, "webdataset"))
    assert (
        "part-00001.parquet is not usable (shards/00001.tar missing): regenerating shard 1"
        in capsys.readouterr().out
    )
    assert (summary["generated"], summary["manifest_rows"]) == (16, 24)
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before, (
        "byte-identical, no temp file"
    )
    assert (inodes(out / "shards")["00000.tar"], inodes(out / "manifest")["part-00000.parquet"]) == untouched
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["counts"]["generated_shards"], stats["counts"]["skipped_shards"]) == (2, 1)
    assert stats["failures"]["unusable_shards"] == 1
    assert sum(stats["captions"]["words_histogram"].values()) == 24
    assert verify_output(str(out)).ok


@pytest.mark.slow  # fault injection: a damaged tar, repaired by a rerun
def test_verify_names_a_corrupted_tar_member_and_repair_restores_it(runs, ckpt, tmp_path):
    out = copy_of(runs, "webdataset", tmp_path)
    row = next(r for r in rows_of(out) if r["seed"] == 11)
    tar = out / "shards" / "00001.tar"
    original = tar.read_bytes()
    damaged = bytearray(original)
    damaged[row["tar_offset"] + row["tar_size"] // 2] ^= 0xFF  # same size: only --verify reads the bytes
    tar.write_bytes(bytes(damaged))
    shutil.copy(out / "shards" / "00000.tar", out / "shards" / "00009.tar")  # a shard the run does not have

    assert run_generation(cfg_for(ckpt, out, "webdataset"))["generated"] == 0
    report = verify_output(str(out))
    text = "\n".join(report.lines())
    assert not report.ok and report.damaged_shards == [1] and report.extra_tars == ["shards/00009.tar"]
    assert (
        "part-00001.parquet: damaged (1 images bad: shards/00001.tar#11.png differs from its sha256" in text
    )
    assert "shards/00009.tar: not a shard of this run" in text
    assert (report.lost, report.duplicated, report.mismatched) == (0, 0, 1)

    assert run_generation(cfg_for(ckpt, out, "webdataset", repair=True))["generated"] == 8
    assert tar.read_bytes() == original and not (out / "shards" / "00009.tar").exists()
    assert verify_output(str(out)).ok
    assert json.loads((out / "stats.json").read_text())["failures"]["repaired_shards"] == 1


def test_verify_names_a_corrupted_embedded_image(runs, tmp_path):
    out = copy_of(runs, "parquet", tmp_path)
    part = out / "manifest" / "part-00000.parquet"
    table = pq.read_table(part)
    images = table["image"].to_pylist()
    images[3]["bytes"] = images[3]["bytes"][:-1] + b"\0"
    field = table.schema.field("image")
    pq.write_table(
        table.set_column(table.schema.get_field_index("image"), field, pa.array(images, field.type)), part
    )
    report = verify_output(str(out))
    assert report.damaged_shards == [0] and report.mismatched == 1
    assert "1 images bad: manifest/part-00000.parquet#3.png differs from its sha256" in "\n".join(
        report.lines()
    )


@pytest.mark.slow  # three more runs over a copied output (test_generate checks the run identity)
def test_the_format_is_part_of_the_run_identity(runs, ckpt, tmp_path):
    out = copy_of(runs, "webdataset", tmp_path)
    with pytest.raises(
        GenerateError, match=r"format: existing 'webdataset', this run 'parquet'.*--overwrite"
    ):
        run_generation(cfg_for(ckpt, out, "parquet"))
    summary = run_generation(cfg_for(ckpt, out, "parquet", num_seeds=8, overwrite=True))
    assert summary["generated"] == summary["manifest_rows"] == 8
    assert sorted(os.listdir(out)) == PARQUET_OUTPUT
    assert json.loads((out / "run.json").read_text())["format"] == "parquet"
    assert json.loads((out / "stats.json").read_text())["counts"]["seeds"] == 8


def test_the_readme_snippets_run_as_written(runs, tmp_path, monkeypatch):
    """README.md's Python snippets for the formats, pointed at this module's outputs."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    section = README.read_text().split("## The output formats")[1].split("\n## ")[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 3, "README.md lost its format examples"
    seven = next(r for r in rows_of(runs["webdataset"]) if r["seed"] == 7)
    found = []
    for code in snippets:
        fmt = "parquet" if "load_dataset" in code else "webdataset"
        names: dict = {}
        exec(code.replace('"outputs/run1"', repr(str(runs[fmt]))), names)
        found.append(names)
    assert found[0]["seed"] == "23" and isinstance(found[0]["image"], Image.Image)
    assert found[0]["caption"] == rows_of(runs["webdataset"])[-1]["caption"]
    assert sha(found[1]["png"]) == seven["image_sha256"]
    assert sha(found[2]["png"]) == seven["image_sha256"] and found[2]["intact"] is True


def test_a_run_json_from_before_formats_is_a_files_run(tmp_path):
    info = {"model_digest": "d", "seeds": {}, "shard_size": 8, "steps": None, "bf16": None, "run_id": "r"}
    (tmp_path / "run.json").write_text(json.dumps(info))
    assert manifest.read_run(str(tmp_path))["format"] == "files"


@pytest.fixture
def s3_tars(monkeypatch):
    """webdataset opens s3:// URLs through fsspec (s3fs, the moto server from the environment)."""
    monkeypatch.setitem(
        webdataset.gopen_schemes,
        "s3",
        lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open(),
    )


@pytest.mark.slow  # formats on S3 (moto): whole runs, resumed
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_round_trip_and_resume_on_s3(fmt, ckpt, ray_local, s3_server, s3_tars, tmp_path):
    out = f"s3://inkseed-test/formats/{fmt}-{uuid.uuid4().hex[:8]}"
    cfg = cfg_for(ckpt, out, fmt)
    run_generation(cfg)
    if fmt == "webdataset":
        check_webdataset(out, rows_of(out))
        lost = manifest.tar_uri(out, 1)
    else:
        check_parquet(out, tmp_path / "hf")
        lost = manifest.part_uri(out, 1)
    assert storage.list_files(storage.join(out, "images")) == []
    before = storage.read_bytes(lost)
    storage.delete_file(lost)
    again = run_generation(cfg)
    assert (again["generated"], again["manifest_rows"]) == (8, 24)
    if fmt == "webdataset":
        assert storage.read_bytes(lost) == before, "the regenerated tar is byte-identical"
    else:  # the same rows and embedded images; only created_at is new
        fs, path = storage.filesystem(lost)
        regenerated = pq.read_table(path, filesystem=fs)
        assert regenerated.drop_columns(["created_at"]).equals(
            pq.read_table(io.BytesIO(before)).drop_columns(["created_at"])
        )
        assert regenerated.schema.metadata[b"huggingface"] == manifest.HF_FEATURES.encode()
    assert verify_output(out).ok
    stats = json.loads(storage.read_bytes(storage.join(out, "stats.json")))
    assert (stats["counts"]["skipped_shards"], stats["counts"]["manifest_rows"]) == (2, 24)
    assert storage.read_bytes(storage.join(out, "contact_sheet.png")).startswith(b"\x89PNG")
