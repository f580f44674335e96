"""Local paths and s3:// URIs behind one small API.

Every job reads and writes through here, so a dataset, a Ray Train storage path or a
generation output can be a local folder or any S3-compatible store. s3:// goes through
s3fs (wrapped as a pyarrow filesystem), so the endpoint and credentials come from the usual
AWS environment variables and config files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws/...).
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid

import pyarrow.fs as pafs

from model.io import atomic_write


class StorageError(RuntimeError):
    """A path or URI that cannot be read or written, with the reason."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        settings = tuple(os.environ.get(k) for k in _S3_SETTINGS)
        return _s3(settings, os.getpid()), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


# The environment an S3 filesystem is built from: a change of any of them builds a new one.
_S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")


@functools.lru_cache(maxsize=8)
def _s3(settings: tuple[str | None, ...], pid: int) -> pafs.FileSystem:
    """One S3 filesystem per process and S3 environment: a new s3fs per file costs a connection
    setup. The process id is in the key because fsspec instances are not fork-safe, and the
    listing cache is off: other processes (actors, a second job) write to the same prefixes."""
    import s3fs  # imported lazily: local runs never need botocore

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: no such file") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: locally through model.io.atomic_write (temp file, then
    rename), so a reader never sees half a file; an S3 PUT is atomic by itself."""
    fs, path = filesystem(uri)
    if is_s3(uri):  # no folders to make on S3 (a create_dir per PNG would cost a request each)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    atomic_write(path, data)  # makes the parent folders


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Full URIs/paths of the files directly under a folder (sorted); [] when it does not exist."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return [join(uri, n) for n in names if n.endswith(suffix)]


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def check_writable(uri: str) -> None:
    """Raise StorageError naming the URI when a probe file cannot be written and removed there."""
    probe = join(uri, f".inkseed-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except Exception as e:  # any backend error means the same thing to the user
        raise StorageError(f"output {uri!r} is not writable: {type(e).__name__}: {e}") from e


def open_checkpoint(uri: str, device: str = "cpu"):
    """model.checkpoint.load_checkpoint for a local folder or an s3:// prefix (its files are read
    through model.checkpoint.read_checkpoint_files; the hashes are verified on load). Returns an Inkseed."""
    from model.checkpoint import load_checkpoint, load_checkpoint_files, read_checkpoint_files

    if not is_s3(uri):
        return load_checkpoint(uri, device=device)
    ink = load_checkpoint_files(read_checkpoint_files(lambda name: read_bytes(join(uri, name)), uri), device)
    ink.path = uri
    return ink
