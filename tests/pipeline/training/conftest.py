"""Fixtures of the training tests: one small rendered dataset for the whole session."""

from __future__ import annotations

import pytest

from pipeline.data.engrave import render_dataset


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> str:
    """160 engravings of 64 px (read at 32 px by configs/tiny.yaml): ~144 train rows, ~16 val."""
    out = str(tmp_path_factory.mktemp("data"))
    render_dataset(out, count=160, size=64, seed=0)
    return out
