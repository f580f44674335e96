"""The dataset formats ingestion reads, on the driver: image folders (metadata.jsonl / .csv) and
Parquet, locally or on s3://, turned into one row table (file name, caption, attributes, skip
reason, image URI or bytes). Captions are cleaned here; images are decoded later in Ray Data
tasks (pipeline/data/decode.py). The format rules are in pipeline/data/ingest.py's docstring.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

if TYPE_CHECKING:
    from model.tokenizer import CaptionTokenizer

SkipReason = Literal["missing_file", "unreadable_image", "empty_caption", "non_utf8", "bad_metadata"]
Split = Literal["train", "val", "all"]
SkipReason = Literal["missing_file", "unreadable_image", "empty_caption", "non_utf8", "bad_metadata"]
CAPTION_COLUMNS = ("text", "caption")  # accepted caption column names, in order of preference
IMAGE_COLUMNS = ("image", "image_bytes", "image_path", "file_name", "path")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Columns of the intermediate rows shared by both input formats.
ROW_SCHEMA = pa.schema(
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



@functools.lru_cache(maxsize=2)
def tokenizer_from_json(tokenizer_json: str) -> CaptionTokenizer:
    """The tokenizer a Ray task was handed as JSON, parsed once per worker process."""
    from model.tokenizer import CaptionTokenizer

    return CaptionTokenizer.from_json(tokenizer_json)


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


def imagefolder_rows(
    uri: str, split: Split, max_words: int, tokenizer: CaptionTokenizer | None, caption_column: str | None
) -> pa.Table:
    rows, columns = _read_metadata(uri)
    cap_col = _pick_caption_column(columns, uri, caption_column)
    if "file_name" not in columns:
        raise DatasetError(f"{uri}: metadata has no 'file_name' column (columns: {columns})")
    out: dict[str, list] = {k: [] for k in ROW_SCHEMA.names}
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
    return pa.table(out, schema=ROW_SCHEMA)


def _safe_str(s: str) -> str:
    """A metadata string with invalid bytes replaced, so Arrow can hold it."""
    return s.encode("utf-8", errors="replace").decode("utf-8")


@dataclass(frozen=True)
class ParquetLayout:
    files: list[str]  # full URIs
    root: str  # folder that relative image paths start from
    caption: str
    image: str
    image_kind: Literal["bytes", "struct", "path"]
    name: str | None  # a separate file_name column, if any


def parquet_layout(uri: str, caption_column: str | None) -> ParquetLayout:
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
        return ParquetLayout(files, root, caption, image, kind, name)
    raise DatasetError(
        f"{uri}: no image column (one of {IMAGE_COLUMNS} with bytes, {{bytes, path}} or paths)"
    )


def parquet_rows(
    table: pa.Table, layout: ParquetLayout, split: Split, max_words: int, tokenizer_json: str | None
) -> pa.Table:
    """Ray map_batches (pyarrow): Parquet columns -> the shared intermediate rows."""
    tokenizer = tokenizer_from_json(tokenizer_json) if tokenizer_json else None
    captions = table.column(layout.caption).to_pylist()
    images = table.column(layout.image).to_pylist()
    names = table.column(layout.name).to_pylist() if layout.name else [None] * len(captions)
    skip_cols = {layout.caption, layout.image, layout.name}
    extra_cols = {c: table.column(c).to_pylist() for c in table.column_names if c not in skip_cols}
    out: dict[str, list] = {k: [] for k in ROW_SCHEMA.names}
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
    return pa.table(out, schema=ROW_SCHEMA)


def is_imagefolder(uri: str) -> bool:
    return storage.is_dir(uri) and any(storage.exists(storage.join(uri, m)) for m in METADATA_FILES)


def check_exists(uri: str) -> None:
    if not storage.exists(uri):
        raise DatasetError(f"dataset path {uri!r} does not exist")


@contextlib.contextmanager
def parquet_reader_v1() -> Iterator[None]:
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

