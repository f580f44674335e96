"""The dataset formats ingestion reads, on the driver: image folders (metadata.jsonl / .csv) and
Parquet, locally or on s3://, turned into one row table (file name, caption, attributes, skip
reason, image URI or bytes). Captions are cleaned here and image paths confined to the dataset
(pipeline/data/paths.py); images are decoded later in Ray Data tasks (pipeline/data/decode.py).
The format rules are in pipeline/data/ingest.py's docstring.
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
from pipeline.data.paths import resolve_image_path

if TYPE_CHECKING:
    from model.tokenizer import CaptionTokenizer

Split = Literal["train", "val", "all"]
SkipReason = Literal[
    "missing_file", "unreadable_image", "empty_caption", "non_utf8", "bad_metadata",
    "bad_path", "too_large", "read_error", "duplicate",
]  # fmt: skip
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
    when a tokenizer is given), else the SkipReason of a caption that cannot be used: missing
    (None) is `empty_caption`, a number, list or object is `bad_metadata`."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "", "non_utf8"
    if raw is None:
        return "", "empty_caption"
    if not isinstance(raw, str):
        return "", "bad_metadata"
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


def _read_metadata(uri: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of metadata.jsonl / metadata.csv (invalid bytes kept as surrogates, a leading BOM
    dropped) and the columns. A row that does not parse (bad JSON, not an object, a CSV row with
    more fields than the header) is {"__bad__": True}."""
    for name in METADATA_FILES:
        path = storage.join(uri, name)
        if not storage.exists(path):
            continue
        text = storage.read_bytes(path).decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        if name.endswith(".csv"):
            return _read_csv(text, path)
        rows: list[dict[str, Any]] = []
        # JSON Lines ends lines with "\n" only: str.splitlines() would also split at U+2028,
        # U+0085 and other separators that are legal inside a JSON string.
        for line in text.split("\n"):
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


def _read_csv(text: str, path: str) -> tuple[list[dict[str, Any]], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[dict[str, Any]] = []
    try:
        for row in reader:  # extra fields land under the key None: the row does not fit the header
            rows.append({"__bad__": True} if None in row else row)
    except csv.Error as e:  # a NUL byte, a field over the csv module's size limit
        raise DatasetError(f"{path}: line {reader.line_num} is not valid CSV ({e})") from e
    return rows, list(reader.fieldnames or [])


def _pick_caption_column(columns: list[str], uri: str, caption_column: str | None) -> str:
    wanted = (caption_column,) if caption_column else CAPTION_COLUMNS
    for c in wanted:
        if c in columns:
            return c
    raise DatasetError(f"{uri}: no caption column {' or '.join(map(repr, wanted))} (columns: {columns})")


def imagefolder_rows(
    uri: str,
    split: Split,
    max_words: int,
    tokenizer: CaptionTokenizer | None,
    caption_column: str | None,
    allow_external: bool = False,
) -> pa.Table:
    rows, columns = _read_metadata(uri)
    cap_col = _pick_caption_column(columns, uri, caption_column)
    if "file_name" not in columns:
        raise DatasetError(f"{uri}: metadata has no 'file_name' column (columns: {columns})")
    out: dict[str, list] = {k: [] for k in ROW_SCHEMA.names}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        name = row.get("file_name")
        image_uri = None
        if row.get("__bad__") or not isinstance(name, str) or not name:
            caption, status, name = "", "bad_metadata", f"bad-metadata-row-{i}"
        elif _safe_str(name) in seen:
            caption, status = "", "duplicate"  # the first row of a file name is the one kept
        else:
            caption, status = clean_caption(row.get(cap_col), max_words, tokenizer)
            image_uri, bad = resolve_image_path(uri, name, allow_external)
            status = bad or status
        name = _safe_str(name)
        seen.add(name)
        if split != "all" and split_of(name) != split:
            continue
        extra = {
            str(k): _safe_str(v) if isinstance(v, str) else v
            for k, v in row.items()
            if k not in ("file_name", cap_col, "__bad__")
        }
        out["file_name"].append(name)
        out["caption"].append(caption)
        out["attributes"].append(json.dumps(extra, sort_keys=True, default=str))
        out["skip"].append(status)
        out["image_uri"].append(image_uri)
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
    """Which columns hold the caption, the image and the file name; DatasetError naming the column
    when one has the wrong type (numbers as captions, image bytes stored as strings)."""
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
    if not _is_text(schema.field(caption).type, binary_ok=True):
        kind = schema.field(caption).type
        raise DatasetError(f"{uri}: caption column {caption!r} has type {kind}; captions must be strings")
    for image in IMAGE_COLUMNS:
        if image not in columns:
            continue
        t = schema.field(image).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            kind = "bytes"
        elif pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            kind = "struct"
            inner = t.field("bytes").type
            if not (pa.types.is_binary(inner) or pa.types.is_large_binary(inner)):
                raise DatasetError(f"{uri}: column {image!r} stores its image bytes as {inner}; write them as binary")
        elif _is_text(t):
            kind = "path"
            _refuse_bytes_as_strings(files[0], image, uri)
        else:
            continue
        name = "file_name" if "file_name" in columns and image != "file_name" else None
        return ParquetLayout(files, root, caption, image, kind, name)
    raise DatasetError(
        f"{uri}: no image column (one of {IMAGE_COLUMNS} with bytes, {{bytes, path}} or paths)"
    )


def _is_text(t: pa.DataType, binary_ok: bool = False) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)
        or (binary_ok and (pa.types.is_binary(t) or pa.types.is_large_binary(t)))
    )  # fmt: skip


def _refuse_bytes_as_strings(file: str, column: str, uri: str) -> None:
    """A string column read as paths must hold paths: its first values are checked, so image bytes
    decoded into strings give one clear error instead of a bad_path per row."""
    fs, path = storage.filesystem(file)
    with fs.open_input_file(path) as f:
        first = next(pq.ParquetFile(f).iter_batches(batch_size=8, columns=[column]), None)
    values = [v for v in (first.column(0).to_pylist() if first is not None else []) if v]
    if any(not str(v).isprintable() for v in values):
        raise DatasetError(
            f"{uri}: column {column!r} is a string column that holds binary data (image bytes stored as "
            "strings?); write image bytes as binary, or paths as plain text"
        )


def parquet_rows(
    table: pa.Table,
    layout: ParquetLayout,
    split: Split,
    max_words: int,
    tokenizer_json: str | None,
    allow_external: bool = False,
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
        path = path if isinstance(path, str) and path else None
        if name is None or name == "":
            name = path or f"sha1:{hashlib.sha1(data or b'').hexdigest()}"  # no name: the content's hash
        name = str(name)  # an integer id column is a name too
        if split != "all" and split_of(name) != split:
            continue
        caption, status = clean_caption(raw, max_words, tokenizer)
        image_uri = None
        if data is None and path:
            image_uri, bad = resolve_image_path(layout.root, path, allow_external)
            status = bad or status
        elif data is None:
            status = status if status not in ("", "truncated") else "missing_file"
        out["file_name"].append(_safe_str(name))
        out["caption"].append(caption)
        scalars = {c: v[i] for c, v in extra_cols.items() if isinstance(v[i], (str, int, float, bool))}
        out["attributes"].append(json.dumps(scalars, sort_keys=True))  # no blobs in attributes
        out["skip"].append(status)
        out["image_uri"].append(image_uri)
        out["image_bytes"].append(data)
    return pa.table(out, schema=ROW_SCHEMA)


def first_occurrences(names: list[str]) -> list[bool]:
    """True where a name is seen for the first time. Names made from an image's content hash
    ("sha1:...", Parquet without file names) always count as first: several captions of the same
    image bytes are several rows, not duplicates."""
    seen: set[str] = set()
    out = []
    for name in names:
        out.append(name.startswith("sha1:") or name not in seen)
        seen.add(name)
    return out


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

