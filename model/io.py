"""The one atomic, durable local file write: a temp file beside the target, fsync, then a rename.

A reader (a resuming job, a second process, an analyst) never sees half a file: the data is
fsynced before the rename, so even a power loss leaves either the old file or the whole new one,
never a truncated one under the final name. A killed writer leaves at most a temp file named
`.<name>.<random>.tmp`, which pyarrow's dataset readers skip (dot-prefixed), the suffix filters
of the listers here (`.parquet`, `.png`) pass over, and `remove_temp_files` sweeps. S3 PUTs are
atomic by themselves (pipeline/storage.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes, *, sync_dir: bool = False) -> None:
    """Write `data` to `path` atomically; parent folders are created. The bytes are fsynced
    before the rename; `sync_dir` also fsyncs the folder after it, so the rename itself survives
    a power loss (for files that others rely on: manifest parts, run.json). The file gets the
    usual permissions (0666 less the umask), as a plain open() would give it: not mkstemp's 0600,
    so analysts and other jobs can read what a run wrote."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(target.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so the renames and new names in it are durable (a no-op where folders
    cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder: nothing more can be done there
        pass
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temp files a killed `atomic_write` left directly in `folder`; returns how many.
    Call it only when no other process writes there (generation holds the output's lease)."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed
