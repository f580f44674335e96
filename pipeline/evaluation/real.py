"""Real images of one split of a dataset, decoded at one size for the probes: uint8 (N, S, S)
plus their captions, file names and grammar attributes (when the metadata carries them).

Images come as uint8, ink dark on light paper: the same format `model.sampling` returns, so real
and generated images reach the probes through exactly the same conversion.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from model.images import to_uint8
from pipeline.data.grammar import ATTRIBUTES


@dataclass
class RealSet:
    """Real images of one split, decoded at one size: uint8 (N, S, S) plus their metadata."""

    images: np.ndarray
    captions: list[str]
    file_names: list[str]
    # Grammar attributes per row (values as str); None for a row without all of them.
    attributes: list[dict[str, str] | None]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, idx: Sequence[int] | np.ndarray) -> RealSet:
        idx = [int(i) for i in idx]
        return RealSet(
            self.images[idx],
            [self.captions[i] for i in idx],
            [self.file_names[i] for i in idx],
            [self.attributes[i] for i in idx],
        )

    def labeled(self) -> RealSet:
        """The rows that carry every grammar attribute."""
        return self.subset([i for i, a in enumerate(self.attributes) if a is not None])


def grammar_attributes(raw: dict, spec: dict[str, tuple[str, ...]] = ATTRIBUTES) -> dict[str, str] | None:
    """The grammar attributes of one metadata row (values as str), None if any is missing or unknown."""
    out = {}
    for name, values in spec.items():
        value = raw.get(name)
        if value is None or str(value) not in values:
            return None
        out[name] = str(value)
    return out


def load_real(uri: str, image_size: int, split: Literal["train", "val"], limits: Any = None) -> RealSet:
    """Every row of one split of a dataset (any format pipeline/data/ingest.py reads), sorted by file name
    so the same dataset always gives the same order. `limits`: a config with the ingestion limits
    (EvaluateConfig's allow_external_paths, max_image_bytes, max_image_pixels); None = the defaults."""
    from pipeline.data.ingest import read_dataset, read_options  # Ray Data; so the probe itself needs no Ray

    # No caption truncation: a cut caption would no longer parse in the grammar.
    options = read_options(limits) if limits is not None else {}
    ds = read_dataset(uri, image_size=image_size, split=split, max_caption_tokens=1024, **options)
    images, captions, names, attrs = [], [], [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        images.append(to_uint8(np.asarray(batch["image"], dtype=np.float32)))  # (B, S, S) in [-1, 1] -> uint8
        captions += [str(c) for c in batch["caption"]]
        names += [str(n) for n in batch["file_name"]]
        attrs += [grammar_attributes(json.loads(a or "{}")) for a in batch["attributes"]]
    order = np.argsort(np.asarray(names), kind="stable")
    stacked = np.concatenate(images)
    return RealSet(stacked, captions, names, attrs).subset(order)
