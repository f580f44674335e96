"""Procedural engravings: the embedded default dataset of inkseed.

`make_sample(seed, index, size)` draws sample `index` of a dataset: a scene from the grammar
(pipeline/data/grammar.py), its caption, and the engraving (`render`, pipeline/data/scenes.py):
black ink on off-white paper, every tone made of line work (parallel hatching, cross-hatching,
wave lines, stipple), outlined shapes, a double plate border. `render_dataset` writes a
deterministic dataset in the Hugging Face imagefolder convention, plus a contact sheet.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from model.images import png_bytes
from model.sampling import available_cpus
from pipeline import storage
from pipeline.contact_sheet import write_sheet
from pipeline.data.grammar import make_caption, sample_attributes
from pipeline.data.plate import check_size
from pipeline.data.scenes import render

__all__ = ["check_size", "default_workers", "make_sample", "png_bytes", "render", "render_dataset", "sample_rng"]

# ---------------------------------------------------------------- the dataset


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of one sample: depends on (seed, index) only, never on the count or the
    worker (string seeds go through SHA-512 in `random`, so this is stable across runs)."""
    return random.Random(f"inkseed:{seed}:{index}")


def make_sample(seed: int, index: int, size: int) -> tuple[dict[str, str], str, np.ndarray]:
    """(attributes, caption, image) of sample `index` of a dataset."""
    rng = sample_rng(seed, index)
    attrs = sample_attributes(rng)
    caption = make_caption(attrs, rng)
    return attrs, caption, render(attrs, size, rng)


def _render_range(out: str, size: int, seed: int, start: int, stop: int) -> list[str]:
    """Render and write samples [start, stop); returns their metadata.jsonl lines."""
    lines = []
    for i in range(start, stop):
        attrs, caption, image = make_sample(seed, i, size)
        name = f"images/{i:06d}.png"
        storage.write_bytes(storage.join(out, name), png_bytes(image))
        lines.append(json.dumps({"file_name": name, "text": caption, **attrs}))
    return lines


def render_dataset(out: str, count: int, size: int, seed: int, workers: int = 1) -> None:
    """Write `count` engravings to `out` (local path or s3://): images/NNNNNN.png,
    metadata.jsonl (file_name, text, one field per attribute) and contact_sheet.png (the first
    16 with captions). Same arguments, same bytes, whatever `workers` is."""
    check_size(size)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    chunk = 500
    ranges = [(s, min(s + chunk, count)) for s in range(0, count, chunk)]
    if workers == 1:
        parts = [_render_range(out, size, seed, a, b) for a, b in ranges]
    else:
        # spawn, not fork: a caller may hold threads (Ray driver, an S3 client) whose locks a
        # forked child would inherit mid-use.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_render_range, out, size, seed, a, b) for a, b in ranges]
            parts = [f.result() for f in futures]
    lines = [line for part in parts for line in part]
    storage.write_bytes(storage.join(out, "metadata.jsonl"), ("\n".join(lines) + "\n").encode())
    first = [make_sample(seed, i, size) for i in range(min(16, count))]
    write_sheet(
        [img for _, _, img in first], [f"sample {i}" for i in range(len(first))], [cap for _, cap, _ in first],
        storage.join(out, "contact_sheet.png"),
    )


def default_workers() -> int:
    """Worker processes for the prepare_data job: one per available core."""
    return available_cpus()
