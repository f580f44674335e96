"""The one atomic local file write: a temp file beside the target, then a rename.

A reader (a resuming job, a second process, an analyst) never sees half a file, and a killed
writer leaves at most a dot-prefixed temp file that every lister here ignores. S3 PUTs are
atomic by themselves (pipeline/storage.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[str], None]) -> None:
    """Write `data` (bytes, or a function that writes the file at the path it is given) to
    `path` atomically; parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
        if callable(data):
            data(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
