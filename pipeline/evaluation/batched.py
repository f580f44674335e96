"""The model's sampling API over many inputs, in batches of a fixed size (memory stays flat)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.checkpoint import Inkseed


@dataclass
class Generated:
    seeds: list[int]
    images: np.ndarray  # uint8 (N, S, S)
    captions: list[str]
    alignment: np.ndarray  # float32 (N,)


def generate_batched(ink: Inkseed, seeds: Sequence[int], batch_size: int) -> Generated:
    images, captions, scores = [], [], []
    for i in range(0, len(seeds), batch_size):
        s = ink.generate(list(seeds[i : i + batch_size]))
        images.append(s.images)
        captions += s.captions
        scores.append(s.alignment)
    return Generated(list(seeds), np.concatenate(images), captions, np.concatenate(scores))


def _batched(fn: Callable[[int, int], Any], n: int, batch_size: int) -> list[Any]:
    return [fn(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def caption_batched(ink: Inkseed, images: np.ndarray, batch_size: int) -> list[str]:
    return [
        c for part in _batched(lambda a, b: ink.caption(images[a:b]), len(images), batch_size) for c in part
    ]


def illustrate_batched(
    ink: Inkseed, captions: Sequence[str], seeds: Sequence[int], batch_size: int
) -> np.ndarray:
    parts = _batched(
        lambda a, b: ink.illustrate(list(captions[a:b]), list(seeds[a:b])), len(captions), batch_size
    )
    return np.concatenate(parts)


def alignment_batched(
    ink: Inkseed, images: np.ndarray, captions: Sequence[str], batch_size: int
) -> np.ndarray:
    parts = _batched(lambda a, b: ink.alignment(images[a:b], list(captions[a:b])), len(captions), batch_size)
    return np.concatenate(parts)
