"""Dataset ingestion: any supported image+caption dataset -> a Ray Dataset of model-ready rows.

Accepted inputs (local paths or s3:// URIs, through pipeline/storage.py):
- an image folder with ``metadata.jsonl`` or ``metadata.csv`` (the Hugging Face imagefolder
  convention): ``file_name`` (relative to the folder, or absolute / s3://), the caption in
  ``text`` (or ``caption``), any other fields kept as the row's ``attributes``;
- Parquet (one file, or a folder of ``*.parquet``) with a caption column (``text`` or
  ``caption``) and an image column: bytes, a Hugging Face struct ``{bytes, path}``, or a path
  string (relative to the Parquet folder, or absolute / s3://).

Every image is converted to the model's input: RGBA / LA / palette-with-transparency are
composited on white, 16-bit and 32-bit grayscale are scaled to 8 bits, everything goes to
grayscale, then the shorter side is resized to ``image_size`` (Lanczos) and the longer side
center-cropped, so the whole height or width is kept and nothing is padded. Rows:
``image`` float32 (S, S) in [-1, 1] (paper ~ +1, ink ~ -1), ``caption`` str, ``file_name`` str,
``attributes`` JSON str, and ``tokens`` int64 (max_caption_tokens,) when a tokenizer is given.

Bad rows are skipped and counted by reason: ``missing_file``, ``unreadable_image`` (corrupt or
truncated), ``empty_caption`` (empty or whitespace), ``non_utf8`` (caption bytes that are not
UTF-8), ``bad_metadata`` (a metadata line that is not JSON or lacks file_name). Captions longer
than ``max_caption_tokens - 2`` words (tokenizer tokens when one is given) are truncated, kept
and counted. One summary line is printed. When more than ``max_bad_fraction`` of the rows are
bad, ingestion fails with an error giving that share.

How: the small metadata is read on the driver; images are read and decoded in Ray Data
``map_batches`` tasks that mark failures instead of raising; the decoded (uint8) dataset is
materialized once so the skip counts are exact before training starts; a last lazy map drops
the bad rows and produces float32 images and tokens.

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
from pipeline.data.sources import (
    DatasetError,
    Split,
    check_exists,
    clean_caption,
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

__all__ = ["DatasetError", "IngestStats", "clean_caption", "load_dataset", "read_captions", "read_dataset",
           "split_of", "to_model_gray"]

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


def read_captions(uri: str, split: Split = "train", caption_column: str | None = None) -> list[str]:
    """The usable captions of a split, read on the driver (to build the tokenizer). Not
    truncated: the tokenizer should see every word."""
    check_exists(uri)
    big = 10**9
    if is_imagefolder(uri):
        table = imagefolder_rows(uri, split, big, None, caption_column)
    else:
        layout = parquet_layout(uri, caption_column)
        parts = []
        for file in layout.files:
            fs, path = storage.filesystem(file)
            with fs.open_input_file(path) as f:
                cols = [c for c in (layout.caption, layout.image, layout.name) if c]
                parts.append(parquet_rows(pq.read_table(f, columns=cols), layout, split, big, None))
        table = pa.concat_tables(parts)
    return [
        c for c, s in zip(table.column("caption").to_pylist(), table.column("skip").to_pylist()) if s == ""
    ]


def load_dataset(
    uri: str,
    *,
    image_size: int,
    split: Split = "all",
    tokenizer: CaptionTokenizer | None = None,
    max_caption_tokens: int = 32,
    max_bad_fraction: float = 0.05,
    caption_column: str | None = None,
) -> tuple[ray.data.Dataset, IngestStats]:
    """`read_dataset`, also returning the ingestion counts."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if max_caption_tokens < 3:
        raise ValueError(
            f"max_caption_tokens must be at least 3 (bos, a word, eos), got {max_caption_tokens}"
        )
    check_exists(uri)
    tokenizer_json = tokenizer.to_json() if tokenizer is not None else None
    rows = _row_dataset(uri, split, max_caption_tokens - 2, tokenizer, caption_column)  # room for bos, eos
    decoded = rows.map_batches(
        decode_batch, batch_format="numpy", batch_size=BLOCK_ROWS, fn_kwargs={"image_size": image_size}
    ).materialize()
    stats = _check_stats(decoded, uri, split, max_bad_fraction)
    final = decoded.map_batches(
        finalize_batch,
        batch_format="numpy",
        batch_size=BLOCK_ROWS,
        fn_kwargs={"tokenizer_json": tokenizer_json, "max_len": max_caption_tokens},
    )
    return final, stats


def _row_dataset(
    uri: str, split: Split, max_words: int, tokenizer: CaptionTokenizer | None, caption_column: str | None
) -> ray.data.Dataset:
    """The intermediate rows (file name, caption, attributes, skip, image URI or bytes) as a lazy
    Ray Dataset: an image folder's metadata is read here, Parquet is read by Ray Data tasks."""
    import ray.data

    if is_imagefolder(uri):
        table = imagefolder_rows(uri, split, max_words, tokenizer, caption_column)
        blocks = [table.slice(i, BLOCK_ROWS) for i in range(0, max(1, table.num_rows), BLOCK_ROWS)]
        return ray.data.from_arrow(blocks)
    layout = parquet_layout(uri, caption_column)
    fs, _ = storage.filesystem(layout.files[0])
    paths = [storage.filesystem(f)[1] for f in layout.files]
    with parquet_reader_v1():
        rows = ray.data.read_parquet(paths, filesystem=fs)  # every column: extras become attributes
    return rows.map_batches(
        parquet_rows,
        batch_format="pyarrow",
        batch_size=BLOCK_ROWS,
        fn_kwargs={
            "layout": layout,
            "split": split,
            "max_words": max_words,
            "tokenizer_json": tokenizer.to_json() if tokenizer is not None else None,
        },
    )


def _check_stats(decoded: ray.data.Dataset, uri: str, split: Split, max_bad_fraction: float) -> IngestStats:
    """Count the rows by skip reason, print the summary, and refuse an empty or too-bad dataset."""
    skips = decoded.select_columns(["skip"]).to_pandas()
    counts = Counter(skips["skip"]) if "skip" in skips else Counter()  # no columns when empty
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
    return stats


def read_dataset(uri: str, **kwargs: Any) -> ray.data.Dataset:
    """A Ray Dataset of model-ready rows (see the module docstring) from an image folder or
    Parquet, local or s3://; the arguments are `load_dataset`'s. Raises DatasetError for a
    missing path, a missing caption column, an empty dataset, or more bad rows than
    `max_bad_fraction`."""
    return load_dataset(uri, **kwargs)[0]
