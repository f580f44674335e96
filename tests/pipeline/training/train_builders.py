"""Helpers of the training tests (plain functions; the dataset fixture is in conftest.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.faults import FAIL_AFTER_ENV

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "configs" / "tiny.yaml")


def tiny(data: str, storage_path: str, name: str, **changes) -> TrainConfig:
    """configs/tiny.yaml on `data`, in `<storage_path>/<name>`, with `changes`."""
    return load_train_config(TINY).replace(data=data, storage_path=storage_path, name=name, **changes)


def metrics_rows(cfg: TrainConfig, kind: str) -> list[dict]:
    """The run's metrics.jsonl rows of one kind (step, epoch, prior)."""
    text = storage.read_bytes(storage.join(cfg.storage_path, cfg.name, "metrics.jsonl")).decode()
    return [r for r in map(json.loads, text.splitlines()) if r["kind"] == kind]


@contextlib.contextmanager
def failing(**after: int) -> Iterator[None]:
    """Runs started inside inject worker failures (pipeline/training/faults.py), e.g.
    failing(epoch=1, prior_epoch=10, sharpen_step=3): each once, right after that checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAIL_AFTER_ENV, ",".join(f"{k}={v}" for k, v in after.items()))
        yield
