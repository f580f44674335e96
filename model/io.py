"""The one atomic local file write: a temp file beside the target, then a rename.

A reader (a resuming job, a second process, an analyst) never sees half a file, and a killed
writer leaves at most a dot-prefixed temp file, which pyarrow's dataset readers skip and the
suffix filters of the listers here (`.parquet`, `.png`) pass over. S3 PUTs are
atomic by themselves (pipeline/storage.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically; parent folders are created. The file gets the usual
    permissions (0666 less the umask), as a plain open() would give it: not mkstemp's 0600, so
    analysts and other jobs can read what a run wrote."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
