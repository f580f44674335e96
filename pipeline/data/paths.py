"""Where a dataset row may point, and how its image file is read: the trust rules of ingestion.

Confinement. An image path from metadata (a `file_name`, a Parquet path column) must name a file
inside the dataset's root: the folder that holds metadata.jsonl / metadata.csv, or the Parquet
folder (the folder of a single Parquet file). Relative paths are resolved against the root; an
absolute path or s3:// URI is accepted only when it lies inside the root. Locally the check follows
symlinks (`os.path.realpath`), so a link to /etc/passwd is outside too; on S3 a key may not have
`.` or `..` segments (S3 keeps them literally, so they are refused rather than normalised). A path
outside, one with control characters (image bytes stored in a string column), or an s3:// URI
named by a local dataset (and a local path named by an S3 one) is skipped as `bad_path`. With
`allow_external_paths` (`--allow-external-paths`) any absolute path or URI is read as given.

Reading. A file is read only when it is a regular file no larger than `max_image_bytes`: locally it
is opened non-blocking and checked with fstat before a byte is read, so /dev/zero, a FIFO or a
directory is refused at once (`bad_path`) and never hangs or fills memory; on S3 the object's size
comes from a HEAD request first. Bigger files are `too_large`; at most `max_image_bytes + 1` bytes
are ever read (a file growing after the check is caught too). S3 reads that fail for any other
reason than a missing object or a denied one (a 5xx, a reset connection, a timeout) are retried
`READ_ATTEMPTS` times with exponential backoff before the row counts as `read_error`. A missing
object is not retried: S3 is strongly consistent, so a 404 is an answer, and retrying every missing
row would multiply the cost of a dataset with missing files.
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage

MiB = 1 << 20
# A 64 MiB file is far beyond any engraving scan the model reads (it downsamples to <= 512 px).
DEFAULT_MAX_IMAGE_BYTES = 64 * MiB
# 8192 x 8192 = 67 Mpx: 64 MB decoded as grayscale, 256 MB as RGBA, per decoding task. Pillow's own
# bomb check only warns below 89 Mpx and refuses above 179 Mpx, which still lets gigabytes through.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
READ_ATTEMPTS = 4  # S3 reads: the first try and 3 retries
BACKOFF_S = 0.25  # seconds before the first retry, doubled each time (0.25, 0.5, 1.0)
MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class ReadLimits:
    """How far ingestion trusts a dataset (see the module docstring)."""

    allow_external_paths: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ReadFailure(Exception):
    """An image file that is not read; `reason` is the row's skip reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ---------------------------------------------------------------- confinement


def resolve_image_path(root: str, path: object, allow_external: bool = False) -> tuple[str | None, str]:
    """(full path or URI, "") for an image path from metadata, or (None, "bad_path")."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS or not path.isprintable():
        return None, "bad_path"  # also image bytes decoded into a string column
    if allow_external:
        if storage.is_s3(path) or os.path.isabs(path):
            return path, ""
        if storage.is_s3(root):  # "../images/a.png" names a sibling prefix, as it would on a disk
            return "s3://" + posixpath.normpath(storage.join(root, path)[len("s3://") :]), ""
        return storage.join(root, path), ""
    if storage.is_s3(root):
        return _inside_s3_root(root, path)
    if storage.is_s3(path):
        return None, "bad_path"
    base = os.path.realpath(os.path.expanduser(root))
    full = os.path.realpath(os.path.join(base, path))  # an absolute `path` replaces `base` here
    if os.path.commonpath([base, full]) != base:
        return None, "bad_path"
    return full, ""


def _inside_s3_root(root: str, path: str) -> tuple[str | None, str]:
    base = root.rstrip("/")
    if storage.is_s3(path):
        if not path.startswith(base + "/"):
            return None, "bad_path"
        rel = path[len(base) + 1 :]
    elif path.startswith("/"):
        return None, "bad_path"  # a local absolute path named by an S3 dataset
    else:
        rel = path
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return None, "bad_path"
    return f"{base}/{rel}", ""


# ---------------------------------------------------------------- bounded, retried reads


def read_image_bytes(uri: str, max_bytes: int) -> bytes:
    """The bytes of one image file; ReadFailure(reason) when it is not read (module docstring)."""
    if not storage.is_s3(uri):
        return _read_local(uri, max_bytes)
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_s3(uri, max_bytes)
        except ReadFailure:
            raise
        except PermissionError as e:  # denied: retrying will not help
            raise ReadFailure("read_error", f"{uri}: {e}") from e
        except FileNotFoundError as e:
            raise ReadFailure("missing_file", uri) from e
        except Exception as e:  # 5xx, reset connection, timeout: any other backend error
            if attempt == READ_ATTEMPTS - 1:
                raise ReadFailure("read_error", f"{uri}: {type(e).__name__}: {e}") from e
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _read_local(path: str, max_bytes: int) -> bytes:
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise ReadFailure("missing_file", path) from e
    except OSError as e:
        raise ReadFailure("read_error", f"{path}: {e}") from e
    try:
        info = os.fstat(fd)  # the opened file itself: no race with a path swapped after a check
        if not stat.S_ISREG(info.st_mode):
            raise ReadFailure("bad_path", f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise ReadFailure("too_large", f"{path}: {info.st_size} bytes > max_image_bytes={max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:  # EIO and the like, while reading
        raise ReadFailure("read_error", f"{path}: {e}") from e
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ReadFailure("too_large", f"{path} grew past max_image_bytes={max_bytes}")
    return data


def _read_s3(uri: str, max_bytes: int) -> bytes:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type != pafs.FileType.File:
        raise ReadFailure("bad_path", f"{uri} is not an object")
    if info.size is not None and info.size > max_bytes:
        raise ReadFailure("too_large", f"{uri}: {info.size} bytes > max_image_bytes={max_bytes}")
    with fs.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ReadFailure("too_large", f"{uri} grew past max_image_bytes={max_bytes}")
    return data
