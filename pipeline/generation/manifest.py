"""The output of a generation run: layout, Parquet manifest schema, run.json and resume bookkeeping.

Layout under the output root OUT (a local folder or s3://bucket/prefix), by `--format`:

    OUT/run.json                       what produced this output (see `run_info`)
    OUT/manifest/part-<shard>.parquet  one row per seed of the shard, sorted by seed
    OUT/stats.json, OUT/contact_sheet.png/.html   written at the end of each run (stats.py, contact_sheet.py)
    files (default):
    OUT/images/<shard>/<seed>.png      one grayscale PNG per seed
    webdataset:
    OUT/shards/<shard>.tar             per seed, in seed order: <seed>.png, <seed>.txt (the caption, UTF-8),
                                       <seed>.json (the manifest row less created_at, run_id, tar_offset, tar_size)
    parquet:
    (no image files)                   the PNG bytes are in the part itself, column `image`

Shards are the unit of exactly-once. The run's seeds are a sequence (a range
`seed_start, seed_start+1, ...` or the lines of a seeds file, in file order); shard k holds the
seeds at positions [k * shard_size, (k+1) * shard_size) of that sequence. For a range starting at 0
this is simply `shard = seed // shard_size`. A part file is written only once its shard is complete,
atomically (temp file + fsync + rename locally, a single object PUT on S3), after its images: its
PNGs (files, written by the actors) or its tar (webdataset, written the same atomic way by the
driver just before the part; the part's `inkseed.tar_bytes` metadata is the tar's size).

A part counts as done only when it is readable and its key-value metadata (`PART_META`: run_id,
model digest, shard, row count) match run.json and the shard (and, for webdataset, its tar exists
with that size): a rerun regenerates the shards whose part is missing, truncated, unreadable or
from another run (pipeline/generation/verify.py checks parts; `--verify` also every image's bytes).
OUT/lease.json says which run writes OUT right now (pipeline/generation/lease.py).

`image_path` in the manifest is relative to OUT, so an output can be moved or copied from S3
without rewriting its manifest. `CONTAINER#MEMBER` means the PNG is inside a file:
    files       images/00003/31337.png                 join it onto OUT to open the image
    webdataset  shards/00003.tar#31337.png             the tar member; its bytes are
                                                       tar[tar_offset : tar_offset + tar_size]
    parquet     manifest/part-00003.parquet#31337.png  the row's `image.bytes` in that part
The webdataset parts add `tar_offset`, `tar_size` (int64: the member's data offset and size in
bytes); the parquet parts add `image: struct<bytes: binary, path: string>`, the Hugging Face Image
feature (declared in the part's `huggingface` schema metadata, so `datasets` decodes it to PIL;
`path` is "<seed>.png"). Each format's parts hold only its own extra columns (`schema_for`).
The tar's bytes depend only on the checkpoint, the seeds and the sampling settings (fixed member
mtime 0, uid/gid 0, no run_id or time inside): a regenerated shard is byte-identical.

run.json's `format` is part of the run's identity; a run.json written before formats existed
(no `format` key) is a files run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

INT64_MAX = 2**63 - 1

SCHEMA = pa.schema(
    [
        pa.field("seed", pa.int64(), nullable=False),
        # The shard this seed belongs to (also the folder of its image and the part file's number).
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        # Relative to the output root, '/'-separated: images/<shard>/<seed>.png, or CONTAINER#MEMBER
        # for the formats that pack images into files (`image_path`).
        pa.field("image_path", pa.string(), nullable=False),
        # Hex sha256 of the PNG file's bytes.
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        # Cosine similarity of the image and caption embeddings (contrastive heads), in [-1, 1].
        pa.field("alignment", pa.float32(), nullable=False),
        # The checkpoint digest (model.checkpoint.checkpoint_digest: sha256 over its three files).
        pa.field("model_digest", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        # When the sample was generated.
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

# Output formats (jobs.generate --format): where a seed's PNG goes.
Format = Literal["files", "webdataset", "parquet"]
FORMATS: tuple[str, ...] = ("files", "webdataset", "parquet")

# The columns a format's parts hold beyond SCHEMA.
FORMAT_FIELDS: dict[str, list[pa.Field]] = {
    "files": [],
    "webdataset": [
        # Offset of the PNG member's data in shards/<shard>.tar, and its size, in bytes.
        pa.field("tar_offset", pa.int64(), nullable=False),
        pa.field("tar_size", pa.int64(), nullable=False),
    ],
    # The Hugging Face Image feature's storage type (nullable, as `datasets` declares it: its
    # features only apply to a field that equals theirs).
    "parquet": [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))],
}

# Parquet key-value metadata that makes `datasets` decode the image column to PIL images.
HF_FEATURES = json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})

# Rows per row group of a parquet-format part, at most: about 100 MB of images each, as `datasets`
# writes its own image shards (readers hold one row group at a time).
ROW_GROUP_BYTES = 100 * 2**20


def schema_for(fmt: str) -> pa.Schema:
    """The manifest schema of a format's parts: SCHEMA, then the format's own columns."""
    return pa.schema(list(SCHEMA) + FORMAT_FIELDS[fmt])


# The columns the generation actors return; the driver adds model_digest and run_id.
WORKER_COLUMNS = (
    "seed", "shard", "caption", "image_path", "image_sha256", "width", "height", "alignment", "created_at",
)  # fmt: skip

_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
_TAR_RE = re.compile(r"^(\d+)\.tar$")

# Parquet key-value metadata of every part: which run and checkpoint wrote it, and for which shard.
PART_META = ("inkseed.run_id", "inkseed.model_digest", "inkseed.shard", "inkseed.rows")
# ... and of a webdataset part: the size of its shard's tar in bytes (resume checks it exists whole).
TAR_META = "inkseed.tar_bytes"

# Settings that change which bytes a seed produces or where they go: a rerun must match them to
# resume the output, any other setting (batch size, actors, device) may differ between runs.
IDENTITY_KEYS = ("model_digest", "seeds", "shard_size", "steps", "bf16", "format", "compile")


class ManifestError(RuntimeError):
    """An output whose manifest or run.json does not match what this run expects."""


class SeedsFileError(ValueError):
    """A seeds file that cannot be used, with the file and line."""


@dataclass(frozen=True)
class SeedPlan:
    """The run's seeds as a sequence, split into shards of `shard_size` consecutive positions."""

    count: int  # number of seeds N
    shard_size: int
    seed_start: int = 0  # first seed of a range (unused when `explicit` is given)
    explicit: np.ndarray | None = None  # int64 (N,) seeds from a seeds file, in file order
    source: str = ""  # the seeds file's URI, for run.json only

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def shard_len(self, shard: int) -> int:
        return min(self.shard_size, self.count - shard * self.shard_size)

    def seeds_at(self, positions: np.ndarray) -> np.ndarray:
        """Seeds (int64) at sequence positions (int64)."""
        if self.explicit is not None:
            return self.explicit[positions]
        return self.seed_start + positions.astype(np.int64)

    def shard_seeds(self, shard: int) -> np.ndarray:
        start = shard * self.shard_size
        return self.seeds_at(np.arange(start, start + self.shard_len(shard), dtype=np.int64))

    def describe(self) -> dict[str, Any]:
        """The seed set, as compared between runs: a range, or the seeds file's content hash."""
        if self.explicit is None:
            return {"kind": "range", "seed_start": self.seed_start, "num_seeds": self.count}
        # Hash of the parsed seeds (int64 little-endian, file order), so reformatting the file
        # (blank lines, comments) does not count as a different seed set.
        digest = hashlib.sha256(self.explicit.astype("<i8").tobytes()).hexdigest()
        return {"kind": "file", "num_seeds": self.count, "sha256": digest, "uri": self.source}


def range_plan(seed_start: int, num_seeds: int, shard_size: int) -> SeedPlan:
    if num_seeds <= 0:
        raise ValueError(f"num_seeds must be > 0, got {num_seeds}")
    if seed_start < 0:
        raise ValueError(f"seed_start must be >= 0, got {seed_start}")
    if seed_start + num_seeds - 1 > INT64_MAX:
        raise ValueError(
            f"seed range {seed_start} .. {seed_start + num_seeds - 1} overflows int64 (max seed {INT64_MAX})"
        )
    return SeedPlan(count=num_seeds, shard_size=shard_size, seed_start=seed_start)


def parse_seeds(text: str, source: str) -> np.ndarray:
    """Seeds of a seeds file: one integer per line; blank lines and '#' comment lines are skipped.
    Negative, int64-overflowing and repeated seeds are errors (each seed is in the manifest once)."""
    seeds: list[int] = []
    first_line: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            seed = int(line)
        except ValueError:
            raise SeedsFileError(f"{source}:{lineno}: not an integer seed: {line[:40]!r}") from None
        if not 0 <= seed <= INT64_MAX:
            raise SeedsFileError(f"{source}:{lineno}: seed {seed} is outside 0 .. {INT64_MAX}")
        if seed in first_line:
            raise SeedsFileError(f"{source}:{lineno}: seed {seed} repeats line {first_line[seed]}")
        first_line[seed] = lineno
        seeds.append(seed)
    if not seeds:
        raise SeedsFileError(f"{source}: no seeds in the file")
    return np.asarray(seeds, dtype=np.int64)


def file_plan(uri: str, shard_size: int) -> SeedPlan:
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except (storage.StorageError, UnicodeDecodeError) as e:
        raise SeedsFileError(f"seeds file {uri}: {e}") from e
    seeds = parse_seeds(text, uri)
    return SeedPlan(count=len(seeds), shard_size=shard_size, explicit=seeds, source=uri)


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def image_path(shard: int, seed: int, fmt: str = "files") -> str:
    """Where a seed's PNG is, relative to the output root (CONTAINER#MEMBER inside a file)."""
    if fmt == "webdataset":
        return f"shards/{shard_name(shard)}.tar#{seed}.png"
    if fmt == "parquet":
        return f"manifest/part-{shard_name(shard)}.parquet#{seed}.png"
    return f"images/{shard_name(shard)}/{seed}.png"


def tar_uri(out: str, shard: int) -> str:
    return storage.join(out, "shards", f"{shard_name(shard)}.tar")


def part_uri(out: str, shard: int) -> str:
    return storage.join(out, "manifest", f"part-{shard_name(shard)}.parquet")


def _shard_files(folder: str, pattern: re.Pattern) -> dict[int, str]:
    """shard -> URI of every file in `folder` whose name matches `pattern` (group 1: the shard)."""
    found = {}
    for uri in storage.list_files(folder):
        m = pattern.match(uri.rsplit("/", 1)[-1])
        if m:
            found[int(m.group(1))] = uri
    return found


def part_shards(out: str) -> dict[int, str]:
    """shard -> part URI, for every part-<shard>.parquet in OUT/manifest (done or not: temp files of
    an interrupted write do not match)."""
    return _shard_files(storage.join(out, "manifest"), _PART_RE)


def tar_shards(out: str) -> dict[int, str]:
    """shard -> tar URI, for every <shard>.tar in OUT/shards (a webdataset output's)."""
    return _shard_files(storage.join(out, "shards"), _TAR_RE)


def write_part(
    out: str,
    shard: int,
    columns: dict[str, list],
    model_digest: str,
    run_id: str,
    fmt: str = "files",
    meta: dict[str, str] | None = None,
) -> None:
    """Write one complete shard's rows as manifest/part-<shard>.parquet, sorted by seed, atomically
    and durably. `columns` holds WORKER_COLUMNS and the format's own (FORMAT_FIELDS); `meta` adds
    key-value metadata. A files part fsyncs its images' folder first, so a part on disk implies
    its PNGs are (a webdataset caller writes the tar, durably, before calling this)."""
    schema = schema_for(fmt)
    n = len(columns["seed"])
    names = WORKER_COLUMNS + tuple(f.name for f in FORMAT_FIELDS[fmt])
    arrays = {name: pa.array(columns[name], type=schema.field(name).type) for name in names}
    arrays["model_digest"] = pa.array([model_digest] * n, type=pa.string())
    arrays["run_id"] = pa.array([run_id] * n, type=pa.string())
    table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema).sort_by("seed")
    kv = {**dict(zip(PART_META, (run_id, model_digest, str(shard), str(n)))), **(meta or {})}
    row_group = None
    if fmt == "parquet":
        kv["huggingface"] = HF_FEATURES
        image_bytes = sum(len(image["bytes"]) for image in columns["image"])
        row_group = max(1, n * ROW_GROUP_BYTES // max(1, image_bytes))
    table = table.replace_schema_metadata(kv)
    buf = io.BytesIO()
    # Page checksums: a flipped bit inside the file fails verification instead of reading as data.
    pq.write_table(table, buf, compression="zstd", write_page_checksum=True, row_group_size=row_group)
    if fmt == "files":
        storage.sync_dir(storage.join(out, "images", shard_name(shard)))
    storage.write_bytes(part_uri(out, shard), buf.getvalue(), durable=True)


def run_info(
    *,
    run_id: str,
    model_digest: str,
    plan: SeedPlan,
    steps: int | None,
    bf16: bool | None,
    fmt: str = "files",
    compile: str = "off",
    config: dict,
    versions: dict,
) -> dict[str, Any]:
    """The content of run.json: the identity keys first, then provenance."""
    return {
        "model_digest": model_digest,
        "seeds": plan.describe(),
        "shard_size": plan.shard_size,
        "steps": steps,
        "bf16": bf16,
        "format": fmt,
        "compile": compile,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "versions": versions,
    }


def read_run(out: str) -> dict[str, Any] | None:
    """OUT/run.json, or None when there is none; ManifestError naming it when it is damaged."""
    uri = storage.join(out, "run.json")
    if not storage.exists(uri):
        return None
    try:
        info = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(
            f"{uri} is not valid JSON ({e}): restore it from a copy, or pass --overwrite to discard this output"
        ) from None
    if isinstance(info, dict):
        info.setdefault("format", "files")  # written before there were formats
        info.setdefault("compile", "off")  # ... or a compile flag
    missing = [k for k in (*IDENTITY_KEYS, "run_id") if not isinstance(info, dict) or k not in info]
    if missing:
        raise ManifestError(
            f"{uri} lacks {', '.join(missing)}: restore it from a copy, or pass --overwrite to discard this output"
        )
    return info


def write_run(out: str, info: dict[str, Any]) -> None:
    data = json.dumps(info, indent=2, sort_keys=False).encode()
    storage.write_bytes(storage.join(out, "run.json"), data, durable=True)


def plan_of_run(info: dict[str, Any], seeds_file: str | None = None) -> SeedPlan:
    """The seed plan run.json describes; a seeds-file run rereads its file (or `seeds_file`) and
    checks that it still holds the same seeds."""
    seeds, shard_size = info["seeds"], int(info["shard_size"])
    if seeds.get("kind") == "range":
        return range_plan(int(seeds["seed_start"]), int(seeds["num_seeds"]), shard_size)
    plan = file_plan(seeds_file or seeds["uri"], shard_size)
    if plan.describe()["sha256"] != seeds.get("sha256"):
        raise SeedsFileError(
            f"seeds file {plan.source} no longer holds the run's seeds (sha256 differs from run.json): "
            "give the original file with --seeds-file"
        )
    return plan


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences in the identity keys between a previous run.json and this run."""
    return [
        f"{k}: existing {old.get(k)!r}, this run {new[k]!r}" for k in IDENTITY_KEYS if old.get(k) != new[k]
    ]


# What a run writes under OUT besides run.json: removed by `clear` (nothing else under OUT is).
OUTPUT_DIRS = ("manifest", "images", "shards")
OUTPUT_FILES = ("stats.json", "contact_sheet.png", "contact_sheet.html")


def clear(out: str) -> None:
    """Remove a previous run's run.json, its folders (manifest/, images/, shards/) and its stats and
    contact sheet, and nothing else under OUT."""
    for name in OUTPUT_DIRS:
        storage.delete_dir(storage.join(out, name))
    for name in (*OUTPUT_FILES, "run.json"):
        storage.delete_file(storage.join(out, name))


def has_output(out: str) -> bool:
    """Whether OUT already holds generation output (manifest parts or images)."""
    return any(storage.exists(storage.join(out, name)) for name in OUTPUT_DIRS)
