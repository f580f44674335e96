"""Sampling API: shapes and types, and the determinism property (a seed's output does not
depend on the batch it lands in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import sampling

from builders import scrambled_tiny

torch.set_num_threads(2)
CAPTIONS = [
    "an engraving of a windmill on the hills, on the left, under a crescent moon at night, with three birds",
    "at dusk, a print of a sailing ship at sea, in the middle",
    "an etching of an oak tree in a field, to the right, by day",
    "a print of a church in the town, on the right, beneath the clouds, with a bird",
]


@pytest.fixture(scope="module")
def tiny():
    return scrambled_tiny(CAPTIONS)


def test_generate_types(tiny):
    model, tok = tiny
    s = sampling.generate(model, tok, [0, 1, 2], steps=10)
    assert s.images.dtype == np.uint8 and s.images.shape == (3, 64, 64)
    assert len(s.captions) == 3 and all(isinstance(c, str) for c in s.captions)
    assert s.alignment.dtype == np.float32 and s.alignment.shape == (3,)
    assert np.all(np.abs(s.alignment) <= 1.0 + 1e-5)
    assert len({c for c in s.captions}) > 1 or len({s.images[i].tobytes() for i in range(3)}) > 1


def test_generate_is_deterministic_per_seed_whatever_the_batch(tiny):
    model, tok = tiny
    seeds = [7, 123456789, 0, 2**40 + 3, 42, 99, 5, 11]
    alone = {s: sampling.generate(model, tok, [s], steps=10) for s in seeds[:3]}
    batches = [seeds, list(reversed(seeds)), seeds[:3] + [1000 + i for i in range(13)]]
    for batch in batches:
        out = sampling.generate(model, tok, batch, steps=10)
        for i, seed in enumerate(batch):
            if seed in alone:
                ref = alone[seed]
                assert out.captions[i] == ref.captions[0]
                diff = np.abs(out.images[i].astype(int) - ref.images[0].astype(int)).max()
                assert diff <= 1, f"seed {seed}: image differs by {diff}/255 inside a batch of {len(batch)}"
                assert abs(out.alignment[i] - ref.alignment[0]) < 1e-3
    again = sampling.generate(model, tok, seeds, steps=10)
    first = sampling.generate(model, tok, seeds, steps=10)
    assert again.captions == first.captions and np.array_equal(again.images, first.images)


def test_different_seeds_differ(tiny):
    model, tok = tiny
    s = sampling.generate(model, tok, [1, 2], steps=10)
    assert not np.array_equal(s.z[0], s.z[1])


def test_temperature_sampling_is_per_seed(tiny):
    model, tok = tiny
    a = sampling.generate(model, tok, [3, 4, 5], steps=5, temperature=1.0, top_k=5)
    b = sampling.generate(model, tok, [5, 3], steps=5, temperature=1.0, top_k=5)
    assert b.captions[0] == a.captions[2] and b.captions[1] == a.captions[0]


def test_beam_search_runs_and_is_batch_independent(tiny):
    model, tok = tiny
    a = sampling.generate(model, tok, [3, 4, 5], steps=5, beams=3)
    b = sampling.generate(model, tok, [5], steps=5, beams=3)
    assert b.captions[0] == a.captions[2]


def test_conditional_modes(tiny):
    model, tok = tiny
    s = sampling.generate(model, tok, [1, 2, 3], steps=5)
    caps = sampling.caption(model, tok, s.images)
    assert len(caps) == 3
    assert caps[1:] == sampling.caption(model, tok, s.images[1:])
    big = np.repeat(np.repeat(s.images, 2, axis=1), 2, axis=2)  # other resolutions are resized
    assert len(sampling.caption(model, tok, big)) == 3
    imgs = sampling.illustrate(model, tok, CAPTIONS[:2], [10, 11])
    assert imgs.shape == (2, 64, 64) and imgs.dtype == np.uint8
    one = sampling.illustrate(model, tok, CAPTIONS[1:2], [11])
    assert np.abs(one[0].astype(int) - imgs[1].astype(int)).max() <= 1
    with pytest.raises(ValueError):
        sampling.illustrate(model, tok, CAPTIONS[:2], [1])
    al = sampling.alignment(model, tok, s.images, s.captions)
    np.testing.assert_allclose(al, s.alignment, atol=1e-4)


def test_interpolate_endpoints_match_generate(tiny):
    model, tok = tiny
    path = sampling.interpolate(model, tok, 8, 9, 5, ddim_steps=10)
    ends = sampling.generate(model, tok, [8, 9], steps=10)
    assert path.images.shape == (5, 64, 64) and len(path.captions) == 5
    assert path.captions[0] == ends.captions[0] and path.captions[-1] == ends.captions[1]
    assert np.abs(path.images[[0, -1]].astype(int) - ends.images.astype(int)).max() <= 1


def test_generate_keeps_training_mode(tiny):
    model, tok = tiny
    model.train()
    sampling.generate(model, tok, [1], steps=2)
    assert model.training
    model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reduce-overhead"])  # "default" plus CUDA graphs, which the CPU skips
def test_compiled_model_gives_the_eager_samples(mode):
    model, tok = scrambled_tiny(CAPTIONS)  # its own copy: compiling is in place
    seeds = list(range(8))
    eager = sampling.generate(model, tok, seeds, steps=5)
    names = list(model.state_dict())
    sampling.compile_model(model, mode)
    compiled = sampling.generate(model, tok, seeds, steps=5)
    assert compiled.captions == eager.captions
    assert np.abs(compiled.images.astype(int) - eager.images.astype(int)).max() <= 1
    np.testing.assert_allclose(compiled.alignment, eager.alignment, atol=2e-3)
    assert list(model.state_dict()) == names  # checkpoints saved after compiling keep their keys
