"""Dataset ingestion: any supported image+caption dataset -> a Ray Dataset of model-ready rows.

Accepted inputs (local paths or s3:// URIs, through pipeline/storage.py):
- an image folder with ``metadata.jsonl`` or ``metadata.csv`` (the Hugging Face imagefolder
  convention; UTF-8, a leading BOM is ignored; JSON Lines are split at "\n" only, so U+2028
  inside a string stays in it): ``file_name`` (relative to the folder), the caption in ``text``
  (or ``caption``), any other fields kept as the row's ``attributes``;
- Parquet (one file, or a folder of ``*.parquet``) with a string caption column (``text`` or
  ``caption``) and an image column: binary bytes, a Hugging Face struct ``{bytes, path}``, or a
  path string (relative to the Parquet folder). A caption column of another type, or image
  bytes stored as strings, is a DatasetError naming the column.

Image paths stay inside the dataset's root (its folder, or the Parquet file's folder, on its
bucket) unless ``allow_external_paths``; files are read only when they are regular files within
``max_image_bytes`` and decoded only within ``max_image_pixels``; S3 reads are retried. The rules
are in pipeline/data/paths.py.

Every image is converted to the model's input: RGBA / LA / palette-with-transparency are
composited on white, 16-bit and float grayscale are scaled to 8 bits by their mode's range
(pipeline/data/decode.py), everything goes to grayscale, then the shorter side is resized to
``image_size`` (Lanczos) and the longer side center-cropped, so the whole height or width is kept
and nothing is padded. Rows: ``image`` float32 (S, S) in [-1, 1] (paper ~ +1, ink ~ -1),
``caption`` str, ``file_name`` str, ``attributes`` JSON str, and ``tokens`` int64
(max_caption_tokens,) when a tokenizer is given.

Bad rows are skipped and counted by reason: ``missing_file``, ``unreadable_image`` (corrupt or
truncated), ``empty_caption`` (missing, empty or whitespace), ``non_utf8`` (caption bytes that
are not UTF-8), ``bad_metadata`` (a metadata line that is not JSON, lacks file_name, has a
caption that is not a string, or a CSV row with more fields than the header), ``bad_path`` (outside
the dataset, or not a regular file), ``too_large`` (above ``max_image_bytes`` or
``max_image_pixels``), ``read_error`` (storage failed, after the retries), ``duplicate`` (a file
name already seen: the first row is kept; Parquet rows named by a content hash are never
duplicates). Captions longer than ``max_caption_tokens - 2`` words (tokenizer tokens when one is
given) are truncated, kept and counted. One summary line is printed. When more than
``max_bad_fraction`` of the rows are bad, ingestion fails with an error giving that share.

How: the small metadata is read on the driver; images are read and decoded in Ray Data
``map_batches`` tasks that mark failures instead of raising; the decoded (uint8) dataset is
materialized once so the skip counts are exact before training starts (Parquet rows keep their
file order, so the duplicates of a file name are found there, on the driver); a last lazy map
drops the bad rows and produces float32 images and tokens.

The train/val split is by file name: ``sha1(file_name) % 10 == 0`` is val, so a row's split
never changes when the dataset grows.
"""


from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.decode import decode_batch, finalize_batch, to_model_gray
from pipeline.data.paths import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ReadLimits
from pipeline.data.sources import (
    DatasetError,
    Split,
    check_exists,
    clean_caption,
    first_occurrences,
    imagefolder_rows,
    is_imagefolder,
    parquet_layout,
    parquet_reader_v1,
    parquet_rows,
    split_of,
)

if TYPE_CHECKING:
    import ray.data

    from model.tokenizer import CaptionTokenizer

__all__ = ["DatasetError", "IngestStats", "ReadLimits", "clean_caption", "load_dataset", "read_captions",
           "read_dataset", "read_options", "split_of", "to_model_gray"]

BLOCK_ROWS = 256  # rows per Ray block / batch: a few MB of decoded images, many tasks to spread


@dataclass
class IngestStats:
    """What ingestion saw, for the rows of the requested split."""

    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows dropped
    truncated: int = 0  # captions cut to fit, rows kept

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return sum(self.skipped.values()) / max(1, self.rows_read)

    def summary(self, uri: str) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"ingested {uri}: {self.rows_read} rows read, {self.rows_kept} kept, "
            f"{self.rows_read - self.rows_kept} skipped ({reasons}), {self.truncated} captions truncated"
        )


# ---------------------------------------------------------------- public API


def read_options(cfg: Any) -> dict[str, Any]:
    """The ingestion limits of a job config (TrainConfig, EvaluateConfig) as `load_dataset` /
    `read_captions` keyword arguments."""
    return {name: getattr(cfg, name) for name in ("allow_external_paths", "max_image_bytes", "max_image_pixels")}


def read_captions(
    uri: str,
    split: Split = "train",
    caption_column: str | None = None,
    allow_external_paths: bool = False,
    **_image_limits: Any,
) -> list[str]:
    """The usable captions of a split, read on the driver (to build the tokenizer). Not
    truncated: the tokenizer should see every word. Rows skipped for their metadata, their path
    or a duplicated file name are left out; images are not read (image limits are ignored)."""
    check_exists(uri)
    big = 10**9
    if is_imagefolder(uri):
        table = imagefolder_rows(uri, split, big, None, caption_column, allow_external_paths)
    else:
        layout = parquet_layout(uri, caption_column)
        parts = []
        for file in layout.files:
            fs, path = storage.filesystem(file)
            with fs.open_input_file(path) as f:
                cols = [c for c in (layout.caption, layout.image, layout.name) if c]
                table = pq.read_table(f, columns=cols)
            parts.append(parquet_rows(table, layout, split, big, None, allow_external_paths))
        table = pa.concat_tables(parts)
    names, captions, skips = (table.column(c).to_pylist() for c in ("file_name", "caption", "skip"))
    return [c for c, s, first in zip(captions, skips, first_occurrences(names)) if s == "" and first]


def load_dataset(
    uri: str,
    *,
    image_size: int,
    split: Split = "all",
    tokenizer: CaptionTokenizer | None = None,
    max_caption_tokens: int = 32,
    max_bad_fraction: float = 0.05,
    caption_column: str | None = None,
    allow_external_paths: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[ray.data.Dataset, IngestStats]:
    """`read_dataset`, also returning the ingestion counts."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if max_caption_tokens < 3:
        raise ValueError(
            f"max_caption_tokens must be at least 3 (bos, a word, eos), got {max_caption_tokens}"
        )
    limits = ReadLimits(allow_external_paths, max_image_bytes, max_image_pixels)
    check_exists(uri)
    tokenizer_json = tokenizer.to_json() if tokenizer is not None else None
    rows = _row_dataset(uri, split, max_caption_tokens - 2, tokenizer, caption_column, allow_external_paths)
    decoded = rows.map_batches(
        decode_batch, batch_format="numpy", batch_size=BLOCK_ROWS,
        fn_kwargs={"image_size": image_size, "limits": limits},
    ).materialize()  # fmt: skip
    # An image folder's duplicates were marked as its metadata was read; Parquet's are found here.
    decoded, stats = _check_stats(decoded, uri, split, max_bad_fraction, find_duplicates=not is_imagefolder(uri))
    final = decoded.map_batches(
        finalize_batch,
        batch_format="numpy",
        batch_size=BLOCK_ROWS,
        fn_kwargs={"tokenizer_json": tokenizer_json, "max_len": max_caption_tokens},
    )
    return final, stats


def _row_dataset(
    uri: str,
    split: Split,
    max_words: int,
    tokenizer: CaptionTokenizer | None,
    caption_column: str | None,
    allow_external: bool,
) -> ray.data.Dataset:
    """The intermediate rows (file name, caption, attributes, skip, image URI or bytes) as a lazy
    Ray Dataset: an image folder's metadata is read here, Parquet is read by Ray Data tasks, in
    file order (so the first row of a duplicated file name is well defined)."""
    import ray.data

    if is_imagefolder(uri):
        table = imagefolder_rows(uri, split, max_words, tokenizer, caption_column, allow_external)
        blocks = [table.slice(i, BLOCK_ROWS) for i in range(0, max(1, table.num_rows), BLOCK_ROWS)]
        return ray.data.from_arrow(blocks)
    layout = parquet_layout(uri, caption_column)
    fs, _ = storage.filesystem(layout.files[0])
    paths = [storage.filesystem(f)[1] for f in layout.files]
    with parquet_reader_v1():
        rows = ray.data.read_parquet(paths, filesystem=fs)  # every column: extras become attributes
    rows.context.execution_options.preserve_order = True  # this dataset and the ones made from it
    return rows.map_batches(
        parquet_rows,
        batch_format="pyarrow",
        batch_size=BLOCK_ROWS,
        fn_kwargs={
            "layout": layout,
            "split": split,
            "max_words": max_words,
            "tokenizer_json": tokenizer.to_json() if tokenizer is not None else None,
            "allow_external": allow_external,
        },
    )


def _check_stats(
    decoded: ray.data.Dataset, uri: str, split: Split, max_bad_fraction: float, find_duplicates: bool
) -> tuple[ray.data.Dataset, IngestStats]:
    """Count the rows by skip reason (marking the later rows of a duplicated file name), print the
    summary, and refuse an empty or too-bad dataset. Returns the dataset, with a `duplicate`
    column when there are duplicates, and the counts."""
    import ray.data

    seen = decoded.select_columns(["file_name", "skip"]).to_pandas()
    skips = list(seen["skip"]) if "skip" in seen else []  # no columns when empty
    first = first_occurrences(list(seen["file_name"])) if skips and find_duplicates else []
    if not all(first):  # Parquet: the rows are in file order, so "first" is the first in the files
        skips = [s if f else "duplicate" for s, f in zip(skips, first)]
        flags = pa.table({"duplicate": [not f for f in first]})
        decoded = decoded.zip(ray.data.from_arrow(flags))  # positional: the same order as `seen`
    counts = Counter(skips)
    stats = IngestStats(
        rows_read=sum(counts.values()),
        skipped={k: v for k, v in counts.items() if k not in ("", "truncated")},
        truncated=counts.get("truncated", 0),
    )
    print(stats.summary(uri), flush=True)  # the user's view of their data: skip counts by reason
    if stats.rows_read == 0:
        raise DatasetError(f"dataset {uri!r} has no rows" + (f" in split {split!r}" if split != "all" else ""))
    if stats.bad_fraction > max_bad_fraction:
        raise DatasetError(
            f"{uri}: {stats.bad_fraction:.1%} of rows are bad, more than max_bad_fraction={max_bad_fraction:.1%} "
            f"({stats.summary(uri)})"
        )
    return decoded, stats


def read_dataset(uri: str, **kwargs: Any) -> ray.data.Dataset:
    """A Ray Dataset of model-ready rows (see the module docstring) from an image folder or
    Parquet, local or s3://; the arguments are `load_dataset`'s. Raises DatasetError for a
    missing path, a missing or mistyped caption column, an empty dataset, or more bad rows than
    `max_bad_fraction`; ValueError for a non-positive image limit."""
    return load_dataset(uri, **kwargs)[0]
