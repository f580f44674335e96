"""Test data builders shared by several test files (plain functions; fixtures are in conftest.py)."""

from __future__ import annotations

import numpy as np
import torch

from model.config import get_preset
from model.networks import JointModel
from model.tokenizer import CaptionTokenizer
from pipeline.data.engrave import make_sample
from pipeline.evaluation.real import RealSet


def scrambled_tiny(captions: list[str], seed: int = 0, **changes) -> tuple[JointModel, CaptionTokenizer]:
    """An untrained tiny (64 px) model (ModelConfig `changes` applied), its caption decoder and
    prior output scrambled so that captions and images vary with the seed, latent stats fitted
    to N(0.5, 2^2); in eval mode."""
    torch.manual_seed(seed)
    tok = CaptionTokenizer.train(captions)
    model = JointModel(get_preset("tiny").replace(**changes), tok.vocab_size)
    scrambled = ("caption_decoder", "prior.out")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(scrambled):
                p.add_(torch.randn_like(p) * 0.3)
        model.fit_latent_stats(torch.randn(256, model.config.z_dim) * 2 + 0.5)
    return model.eval(), tok


def rendered_set(plate_seed: int, start: int, count: int, size: int) -> RealSet:
    """Engravings start..start+count-1 of the renderer with its attributes, straight from memory."""
    samples = [make_sample(plate_seed, i, size) for i in range(start, start + count)]
    return RealSet(
        np.stack([img for _, _, img in samples]),
        [cap for _, cap, _ in samples],
        [f"images/{i:06d}.png" for i in range(start, start + count)],
        [attrs for attrs, _, _ in samples],
    )
