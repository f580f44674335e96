"""The committed default checkpoint's outputs, recorded before the layout change of issue 11: the
same seeds must keep giving the same captions and images within 1/255 per pixel. A silent change
in the sampling math, the prior, the decoders or the tokenizer fails here.

Recorded with one torch thread on the 2-core development machine (tests/golden/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_checkpoint_matches_its_recorded_samples() -> None:
    recorded = np.load(GOLDEN / "default_samples.npz")
    captions = json.loads((GOLDEN / "default_captions.json").read_text())
    seeds = [int(s) for s in recorded["seeds"]]
    assert seeds == captions["seeds"]
    samples = load_checkpoint(REPO / "checkpoints" / "default").generate(seeds)
    assert samples.captions == captions["captions"]
    diff = np.abs(samples.images.astype(np.int16) - recorded["images"].astype(np.int16))
    assert diff.max() <= 1, f"{int((diff > 1).sum())} pixels differ by more than 1/255"
    np.testing.assert_allclose(samples.alignment, recorded["alignment"], atol=2e-3)
