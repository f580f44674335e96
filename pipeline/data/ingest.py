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
and counted. One summary line is logged. When more than ``max_bad_fraction`` of the rows are
bad, ingestion fails with an error giving that share.

How: the small metadata is read on the driver; images are read and decoded in Ray Data
``map_batches`` tasks that mark failures instead of raising; the decoded (uint8) dataset is
materialized once so the skip counts are exact before training starts; a last lazy map drops
the bad rows and produces float32 images and tokens.

The train/val split is by file name: ``sha1(file_name) % 10 == 0`` is val, so a row's split
never changes when the dataset grows.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from model.images import to_float
from pipeline import storage

if TYPE_CHECKING:
    import ray.data

    from model.tokenizer import CaptionTokenizer

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "all"]
SkipReason = Literal["missing_file", "unreadable_image", "empty_caption", "non_utf8", "bad_metadata"]
CAPTION_COLUMNS = ("text", "caption")  # accepted caption column names, in order of preference
IMAGE_COLUMNS = ("image", "image_bytes", "image_path", "file_name", "path")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
BLOCK_ROWS = 256  # rows per Ray block / batch: a few MB of decoded images, many tasks to spread
# Columns of the intermediate rows shared by both input formats.
_ROW_SCHEMA = pa.schema(
    [
        ("file_name", pa.string()),
        ("caption", pa.string()),
        ("attributes", pa.string()),
        ("skip", pa.string()),  # "" kept, "truncated" kept (caption cut), else a SkipReason
        ("image_uri", pa.string()),
        ("image_bytes", pa.binary()),
    ]
)


class DatasetError(ValueError):
    """A dataset that cannot be ingested: missing path or column, empty, or too many bad rows."""


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


def split_of(file_name: str) -> Literal["train", "val"]:
    """Deterministic 90/10 split by file name, stable as the dataset grows."""
    return "val" if int(hashlib.sha1(file_name.encode("utf-8")).hexdigest(), 16) % 10 == 0 else "train"


# ---------------------------------------------------------------- captions


def clean_caption(raw: Any, max_words: int, tokenizer: CaptionTokenizer | None = None) -> tuple[str, str]:
    """(caption, status): status "" when fine, "truncated" when cut to `max_words` words (tokens
    when a tokenizer is given), else the SkipReason of a caption that cannot be used."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "", "non_utf8"
    if not isinstance(raw, str):
        return "", "empty_caption"
    try:
        raw.encode("utf-8")  # metadata read with surrogateescape keeps invalid bytes as surrogates
    except UnicodeEncodeError:
        return "", "non_utf8"
    text = " ".join(raw.split())
    if not text:
        return "", "empty_caption"

    def length(t: str) -> int:
        return len(tokenizer.tokenize(t)) if tokenizer is not None else len(t.split())

    if length(text) <= max_words:
        return text, ""
    words = text.split()[:max_words]
    while len(words) > 1 and length(" ".join(words)) > max_words:
        words.pop()
    return " ".join(words), "truncated"


# ---------------------------------------------------------------- images


def to_model_gray(img: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size) grayscale: composite transparency on white, scale
    16/32-bit to 8 bits, resize the shorter side to `size`, center-crop the longer one."""
    if img.getexif().get(0x0112, 1) != 1:  # a camera's EXIF orientation: turn the pixels upright
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit full range -> 8-bit
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "L":
        img = img.convert("L")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8)


def _read_image_bytes(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)  # raises FileNotFoundError for a missing file
    with fs.open_input_stream(path) as f:
        return f.read()


def _decode_one(data: bytes | None, uri: str | None, size: int) -> tuple[np.ndarray | None, str]:
    """(image, "") or (None, reason)."""
    try:
        if data is None:
            data = _read_image_bytes(uri or "")
    except FileNotFoundError:
        return None, "missing_file"
    except OSError:
        return None, "unreadable_image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: a truncated file fails here, not later
            return to_model_gray(img, size), ""
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "unreadable_image"


def _decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray map_batches: read and decode each row's image; failures become a skip reason."""
    n = len(batch["file_name"])
    images = np.zeros((n, image_size, image_size), dtype=np.uint8)
    skip = np.asarray(batch["skip"], dtype=object).copy()
    for i in range(n):
        if skip[i] not in ("", "truncated"):
            continue
        img, reason = _decode_one(batch["image_bytes"][i], batch["image_uri"][i], image_size)
        if img is None:
            skip[i] = reason
        else:
            images[i] = img
    return {
        "file_name": batch["file_name"],
        "caption": batch["caption"],
        "attributes": batch["attributes"],
        "skip": skip.astype(str),
        "image": images,
    }


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> CaptionTokenizer:
    from model.tokenizer import CaptionTokenizer

    return CaptionTokenizer.from_json(tokenizer_json)


def _finalize_batch(
    batch: dict[str, np.ndarray], tokenizer_json: str | None, max_len: int
) -> dict[str, np.ndarray]:
    """Ray map_batches: drop bad rows, scale images to [-1, 1], add tokens."""
    keep = np.isin(batch["skip"], ["", "truncated"])
    out = {
        "image": to_float(batch["image"][keep]).numpy(),  # (B, S, S) in [-1, 1]
        "caption": batch["caption"][keep],
        "file_name": batch["file_name"][keep],
        "attributes": batch["attributes"][keep],
    }
    if tokenizer_json is not None:
        out["tokens"] = _tokenizer(tokenizer_json).encode(list(out["caption"]), max_len).numpy()  # (B, T)
    return out


# ---------------------------------------------------------------- input formats


def _resolve(root: str, path: str) -> str:
    """An image path from metadata: absolute and s3:// as is, else relative to `root`."""
    if storage.is_s3(path) or os.path.isabs(path):
        return path
    return storage.join(root, path)


def _read_metadata(uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of metadata.jsonl / metadata.csv (invalid bytes kept as surrogates) and the columns."""
    for name in METADATA_FILES:
        path = storage.join(uri, name)
        if not storage.exists(path):
            continue
        text = storage.read_bytes(path).decode("utf-8", errors="surrogateescape")
        if name.endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text, newline=""))
            return list(reader), list(reader.fieldnames or [])
        rows: list[dict[str, Any]] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append(row if isinstance(row, dict) else {"__bad__": True})
        columns = sorted({k for r in rows for k in r if k != "__bad__"})
        return rows, columns
    raise DatasetError(f"{uri}: no {' or '.join(METADATA_FILES)} (expected an image folder or Parquet)")


def _pick_caption_column(columns: list[str], uri: str, caption_column: str | None) -> str:
    wanted = (caption_column,) if caption_column else CAPTION_COLUMNS
    for c in wanted:
        if c in columns:
            return c
    raise DatasetError(f"{uri}: no caption column {' or '.join(map(repr, wanted))} (columns: {columns})")


def _imagefolder_rows(
    uri: str, split: Split, max_words: int, tokenizer: CaptionTokenizer | None, caption_column: str | None
) -> pa.Table:
    rows, columns = _read_metadata(uri)
    cap_col = _pick_caption_column(columns, uri, caption_column)
    if "file_name" not in columns:
        raise DatasetError(f"{uri}: metadata has no 'file_name' column (columns: {columns})")
    out: dict[str, list] = {k: [] for k in _ROW_SCHEMA.names}
    for row in rows:
        name = row.get("file_name")
        if row.get("__bad__") or not isinstance(name, str) or not name:
            caption, status, name = "", "bad_metadata", f"bad-metadata-row-{len(out['file_name'])}"
        else:
            caption, status = clean_caption(row.get(cap_col), max_words, tokenizer)
        name = _safe_str(name)
        if split != "all" and split_of(name) != split:
            continue
        extra = {
            k: _safe_str(v) if isinstance(v, str) else v
            for k, v in row.items()
            if k not in ("file_name", cap_col)
        }
        out["file_name"].append(name)
        out["caption"].append(caption)
        out["attributes"].append(json.dumps(extra, sort_keys=True, default=str))
        out["skip"].append(status)
        out["image_uri"].append(_resolve(uri, name))
        out["image_bytes"].append(None)
    return pa.table(out, schema=_ROW_SCHEMA)


def _safe_str(s: str) -> str:
    """A metadata string with invalid bytes replaced, so Arrow can hold it."""
    return s.encode("utf-8", errors="replace").decode("utf-8")


@dataclass(frozen=True)
class _ParquetLayout:
    files: list[str]  # full URIs
    root: str  # folder that relative image paths start from
    caption: str
    image: str
    image_kind: Literal["bytes", "struct", "path"]
    name: str | None  # a separate file_name column, if any


def _parquet_layout(uri: str, caption_column: str | None) -> _ParquetLayout:
    if storage.is_dir(uri):
        files, root = storage.list_files(uri, ".parquet"), uri
        if not files:
            raise DatasetError(f"{uri}: no metadata.jsonl, metadata.csv or *.parquet files")
    else:
        files, root = (
            [uri],
            uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri)),
        )
    fs, path = storage.filesystem(files[0])
    with fs.open_input_file(path) as f:
        schema = pq.read_schema(f)
    columns = schema.names
    caption = _pick_caption_column(columns, uri, caption_column)
    for image in IMAGE_COLUMNS:
        if image not in columns:
            continue
        t = schema.field(image).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            kind = "bytes"
        elif pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            kind = "struct"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            kind = "path"
        else:
            continue
        name = "file_name" if "file_name" in columns and image != "file_name" else None
        return _ParquetLayout(files, root, caption, image, kind, name)
    raise DatasetError(
        f"{uri}: no image column (one of {IMAGE_COLUMNS} with bytes, {{bytes, path}} or paths)"
    )


def _parquet_rows(
    table: pa.Table, layout: _ParquetLayout, split: Split, max_words: int, tokenizer_json: str | None
) -> pa.Table:
    """Ray map_batches (pyarrow): Parquet columns -> the shared intermediate rows."""
    tokenizer = _tokenizer(tokenizer_json) if tokenizer_json else None
    captions = table.column(layout.caption).to_pylist()
    images = table.column(layout.image).to_pylist()
    names = table.column(layout.name).to_pylist() if layout.name else [None] * len(captions)
    skip_cols = {layout.caption, layout.image, layout.name}
    extra_cols = {c: table.column(c).to_pylist() for c in table.column_names if c not in skip_cols}
    out: dict[str, list] = {k: [] for k in _ROW_SCHEMA.names}
    for i, (raw, image, name) in enumerate(zip(captions, images, names)):
        data, path = None, None
        if layout.image_kind == "bytes":
            data = image
        elif layout.image_kind == "struct":
            data, path = (image or {}).get("bytes"), (image or {}).get("path")
        else:
            path = image
        name = name or path or f"sha1:{hashlib.sha1(data or b'').hexdigest()}"
        if split != "all" and split_of(name) != split:
            continue
        caption, status = clean_caption(raw, max_words, tokenizer)
        if data is None and not path:
            status = status if status not in ("", "truncated") else "missing_file"
        out["file_name"].append(name)
        out["caption"].append(caption)
        scalars = {c: v[i] for c, v in extra_cols.items() if isinstance(v[i], (str, int, float, bool))}
        out["attributes"].append(json.dumps(scalars, sort_keys=True))  # no blobs in attributes
        out["skip"].append(status)
        out["image_uri"].append(_resolve(layout.root, path) if data is None and path else None)
        out["image_bytes"].append(data)
    return pa.table(out, schema=_ROW_SCHEMA)


def _is_imagefolder(uri: str) -> bool:
    return storage.is_dir(uri) and any(storage.exists(storage.join(uri, m)) for m in METADATA_FILES)


def _check_exists(uri: str) -> None:
    if not storage.exists(uri):
        raise DatasetError(f"dataset path {uri!r} does not exist")


@contextlib.contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Build a read_parquet with Ray Data's first Parquet reader. Ray 2.60's default (datasource
    v2) starts 32 footer-reader actors to list files, which takes 30-40 s on a 2-core machine
    even for one small file. The choice is made when the dataset is built, so the global
    DataContext is restored right after."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = getattr(ctx, "use_datasource_v2", None)
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


# ---------------------------------------------------------------- public API


def read_captions(uri: str, split: Split = "train", caption_column: str | None = None) -> list[str]:
    """The usable captions of a split, read on the driver (to build the tokenizer). Not
    truncated: the tokenizer should see every word."""
    _check_exists(uri)
    big = 10**9
    if _is_imagefolder(uri):
        table = _imagefolder_rows(uri, split, big, None, caption_column)
    else:
        layout = _parquet_layout(uri, caption_column)
        parts = []
        for file in layout.files:
            fs, path = storage.filesystem(file)
            with fs.open_input_file(path) as f:
                cols = [c for c in (layout.caption, layout.image, layout.name) if c]
                parts.append(_parquet_rows(pq.read_table(f, columns=cols), layout, split, big, None))
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
    import ray.data

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if max_caption_tokens < 3:
        raise ValueError(
            f"max_caption_tokens must be at least 3 (bos, a word, eos), got {max_caption_tokens}"
        )
    _check_exists(uri)
    max_words = max_caption_tokens - 2  # room for bos and eos
    tokenizer_json = tokenizer.to_json() if tokenizer is not None else None
    if _is_imagefolder(uri):
        table = _imagefolder_rows(uri, split, max_words, tokenizer, caption_column)
        blocks = [table.slice(i, BLOCK_ROWS) for i in range(0, max(1, table.num_rows), BLOCK_ROWS)]
        rows = ray.data.from_arrow(blocks)
    else:
        layout = _parquet_layout(uri, caption_column)
        fs, _ = storage.filesystem(layout.files[0])
        paths = [storage.filesystem(f)[1] for f in layout.files]
        with _parquet_reader_v1():
            rows = ray.data.read_parquet(paths, filesystem=fs)  # every column: extras become attributes
        rows = rows.map_batches(
            _parquet_rows,
            batch_format="pyarrow",
            batch_size=BLOCK_ROWS,
            fn_kwargs={
                "layout": layout,
                "split": split,
                "max_words": max_words,
                "tokenizer_json": tokenizer_json,
            },
        )
    decoded = rows.map_batches(
        _decode_batch, batch_format="numpy", batch_size=BLOCK_ROWS, fn_kwargs={"image_size": image_size}
    ).materialize()

    skips = decoded.select_columns(["skip"]).to_pandas()
    counts = Counter(skips["skip"]) if "skip" in skips else Counter()  # no columns when empty
    stats = IngestStats(
        rows_read=sum(counts.values()),
        skipped={k: v for k, v in counts.items() if k not in ("", "truncated")},
        truncated=counts.get("truncated", 0),
    )
    logger.info(stats.summary(uri))
    if stats.rows_read == 0:
        raise DatasetError(
            f"dataset {uri!r} has no rows" + (f" in split {split!r}" if split != "all" else "")
        )
    if stats.bad_fraction > max_bad_fraction:
        raise DatasetError(
            f"{uri}: {stats.bad_fraction:.1%} of rows are bad, more than max_bad_fraction={max_bad_fraction:.1%} "
            f"({stats.summary(uri)})"
        )
    final = decoded.map_batches(
        _finalize_batch,
        batch_format="numpy",
        batch_size=BLOCK_ROWS,
        fn_kwargs={"tokenizer_json": tokenizer_json, "max_len": max_caption_tokens},
    )
    return final, stats


def read_dataset(
    uri: str,
    *,
    image_size: int,
    split: Split = "all",
    tokenizer: CaptionTokenizer | None = None,
    max_caption_tokens: int = 32,
    max_bad_fraction: float = 0.05,
    caption_column: str | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of model-ready rows (see the module docstring) from an image folder or
    Parquet, local or s3://. Raises DatasetError for a missing path, a missing caption column,
    an empty dataset, or more bad rows than `max_bad_fraction`."""
    ds, _ = load_dataset(
        uri,
        image_size=image_size,
        split=split,
        tokenizer=tokenizer,
        max_caption_tokens=max_caption_tokens,
        max_bad_fraction=max_bad_fraction,
        caption_column=caption_column,
    )
    return ds
