"""model/io.py: the atomic write leaves the whole file or nothing, with the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from model.io import atomic_write


def test_the_file_appears_whole_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "part-00000.parquet"
    atomic_write(target, b"x" * 1000)
    assert target.read_bytes() == b"x" * 1000
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable like a plain open()
    assert [p.name for p in target.parent.iterdir()] == ["part-00000.parquet"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
