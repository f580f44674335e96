"""OUT/stats.json: what a generation run did and what its output holds, written at the end of each
run (as img2dataset writes its stats).

    counts     seeds and shards of the run; seeds and shards generated now, shards skipped (done
               before); manifest rows
    seconds    wall (the whole job), setup (checkpoint, lease, Ray, resume checks), generation,
               validation, contact_sheet; actor_model / actor_encode: the actors' model and PNG
               encode(+write) seconds summed over batches (parallel actors add up past the wall);
               driver_write: the driver's tar and part writes
    seeds_per_s  seeds generated now per second of the generation stage
    failures   unusable_shards (existing parts a rerun could not use, regenerated), repaired_shards
               (damaged shards --repair regenerated), duplicate_rows (rows a retried Ray task
               delivered again, dropped)
    captions   words_histogram {words per caption: captions}, top_words {word: count}, the 50
               most common, most common first (ties in word order)
    alignment  min, p1, p5, p25, p50, p75, p95, p99, max (linear interpolation, as DuckDB's
               quantile_cont), and mean

Counts and times are this invocation's; captions and alignment are computed from every manifest
part (pyarrow, two columns), so a resumed run's statistics cover all its seeds. A word is a
maximal run of letters, digits and apostrophes of the lower-cased caption.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage

QUANTILES = {"min": 0.0, "p1": 0.01, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99, "max": 1.0}  # fmt: skip
TOP_WORDS = 50
NOT_WORD = r"[^\p{L}\p{N}']+"  # RE2 (Arrow's regex engine, and DuckDB's)


def manifest_columns(out: str, columns: list[str]) -> pa.Table:
    """Some columns of every manifest part of OUT (local or s3://), as one table."""
    parts = storage.list_files(storage.join(out, "manifest"), ".parquet")
    fs, _ = storage.filesystem(out)
    try:
        dataset = pads.dataset([storage.filesystem(p)[1] for p in parts], format="parquet", filesystem=fs)
        return dataset.to_table(columns=columns)
    except Exception as e:  # noqa: BLE001
        raise storage.StorageError(f"read {storage.join(out, 'manifest')}: {storage.describe(e)}") from e


def caption_stats(captions: pa.ChunkedArray) -> dict[str, Any]:
    """Words-per-caption histogram and the most common words."""
    split = pc.split_pattern_regex(pc.utf8_lower(captions.combine_chunks()), pattern=NOT_WORD)
    words = pc.list_flatten(split)
    keep = pc.not_equal(words, "")  # the empty strings a leading or trailing separator leaves
    parent = pc.list_parent_indices(split).to_numpy()[keep.to_numpy(zero_copy_only=False)]
    sizes, captions_of_size = np.unique(np.bincount(parent, minlength=len(split)), return_counts=True)
    found = pc.value_counts(pc.filter(words, keep))
    counts = pa.table({"word": found.field("values"), "n": found.field("counts")})
    top = counts.sort_by([("n", "descending"), ("word", "ascending")]).slice(0, TOP_WORDS)
    return {
        "words_histogram": {str(k): int(v) for k, v in zip(sizes, captions_of_size)},
        "top_words": dict(zip(top["word"].to_pylist(), top["n"].to_pylist())),
    }


def alignment_stats(alignment: pa.ChunkedArray) -> dict[str, float]:
    values = alignment.cast(pa.float64())
    q = pc.quantile(values, q=list(QUANTILES.values()), interpolation="linear").to_pylist()
    return {**dict(zip(QUANTILES, q)), "mean": pc.mean(values).as_py()}


def run_stats(out: str, run: dict[str, Any]) -> dict[str, Any]:
    """stats.json's content: `run` (run_id, format, counts, seconds, seeds_per_s, failures, from the
    driver) plus the captions' and alignments' statistics over the whole manifest."""
    table = manifest_columns(out, ["caption", "alignment"])
    return {
        "output": out,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **run,
        "captions": caption_stats(table["caption"]),
        "alignment": alignment_stats(table["alignment"]),
    }


def write_stats(out: str, stats: dict[str, Any]) -> str:
    """Write OUT/stats.json atomically (a single PUT on S3); returns its URI."""
    uri = storage.join(out, "stats.json")
    storage.write_bytes(uri, json.dumps(stats, indent=2).encode(), durable=True)
    return uri
