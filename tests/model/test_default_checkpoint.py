"""The committed default checkpoint (checkpoints/default, what the README's main command uses)
loads without pickle, is a finished `base` run, and makes non-blank engravings with captions in
the grammar; a seed's output is the same alone and in a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import get_preset
from pipeline.data.grammar import parse_caption

DEFAULT = Path(__file__).resolve().parents[2] / "checkpoints" / "default"
SEEDS = list(range(12))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ink():
    return load_checkpoint(DEFAULT)


@pytest.fixture(scope="module")
def samples(ink):
    return ink.generate(SEEDS)


def test_is_a_finished_base_run(ink) -> None:
    base = get_preset("base")
    assert ink.config.image_size == base.image_size and ink.config.channels == base.channels
    assert ink.extra["phase"] == "done"  # the latent prior was fitted
    assert ink.extra["train_config"]["preset"] == "base"
    # The prior's standardization was fitted (identity until then).
    assert not torch.all(ink.model.prior.latent_std == 1)


def test_engravings_are_not_blank_and_captions_parse(samples) -> None:
    images = samples.images.astype(np.float32)
    assert samples.images.shape == (len(SEEDS), 128, 128)
    # Paper is light and the hatching dark: neither the predecessor's black frames nor blank paper.
    assert np.all((images.mean((1, 2)) > 80) & (images.mean((1, 2)) < 245))
    assert np.all(images.std((1, 2)) > 25)
    parsed = [parse_caption(c) for c in samples.captions]
    assert all(p is not None for p in parsed), [c for c, p in zip(samples.captions, parsed) if p is None]
    assert len(set(samples.captions)) >= len(SEEDS) - 2
    assert len({p["subject"] for p in parsed}) >= 3  # not one mode


def test_alignment_prefers_true_pairs(ink, samples) -> None:
    shuffled = ink.alignment(samples.images, samples.captions[1:] + samples.captions[:1])
    assert samples.alignment.mean() > shuffled.mean() + 0.1


def test_a_seed_is_the_same_alone_and_in_a_batch(ink, samples) -> None:
    alone = ink.generate([SEEDS[5]])
    assert alone.captions[0] == samples.captions[5]
    assert np.abs(alone.images[0].astype(int) - samples.images[5].astype(int)).max() <= 1
