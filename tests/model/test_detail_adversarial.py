"""The optional decoder parts: the spatial detail latent (diffused with z by the prior), the
seed-driven noise maps and the PatchGAN term. A seed still fixes image and caption whatever
the batch, and each side of the adversarial game gets only its own gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import sampling
from model.adversarial import PatchDiscriminator, adversarial_terms, diff_augment
from model.checkpoint import load_checkpoint, save_checkpoint

from builders import scrambled_tiny

CAPTIONS = ["a line drawing of a grinning face", "a line drawing of a red apple", "a line drawing of a bus"]
FULL = {"detail_channels": 4, "detail_size": 8, "noise_maps": True, "disc_channels": (16, 32)}


@pytest.fixture(scope="module")
def full():
    return scrambled_tiny(CAPTIONS, **FULL)


def test_latent_sizes_follow_the_config(full):
    model, _ = full
    assert model.latent_dim == 32 + 4 * 8 * 8
    assert model.noise_dim == model.latent_dim + sum(s * s for s in (4, 8, 16, 32, 64))
    x = torch.rand(3, 64, 64) * 2 - 1
    tokens = torch.randint(4, model.vocab_size, (3, 8))
    assert model.prior_latents(x, tokens).shape == (3, model.latent_dim)


def test_a_seed_is_the_same_alone_and_in_any_batch(full):
    model, tok = full
    alone = sampling.generate(model, tok, [5], steps=5)
    batch = sampling.generate(model, tok, [1, 5, 9, 2], steps=5)
    assert batch.captions[1] == alone.captions[0]
    assert np.abs(batch.images[1].astype(int) - alone.images[0].astype(int)).max() <= 1
    assert not np.array_equal(batch.images[0], batch.images[2]), "seeds should differ"


def test_noise_maps_and_detail_change_the_image(full):
    model, _ = full
    z = torch.randn(2, model.config.z_dim)
    with torch.no_grad():
        plain = model.decode_image(z)
        detail = torch.randn(2, *model.detail_shape)
        noise = torch.randn(2, model.noise_dim - model.latent_dim)
        assert (model.decode_image(z, detail) - plain).abs().max() > 1e-3
        assert (model.decode_image(z, None, noise) - plain).abs().max() > 1e-3


def test_interpolation_ends_are_the_seeds_samples(full):
    model, tok = full
    path = sampling.interpolate(model, tok, 3, 8, steps=4, ddim_steps=5)
    ends = sampling.generate(model, tok, [3, 8], steps=5)
    assert path.captions[0] == ends.captions[0] and path.captions[-1] == ends.captions[1]
    assert np.abs(path.images[-1].astype(int) - ends.images[1].astype(int)).max() <= 1


def test_illustrate_is_deterministic_per_seed(full):
    model, tok = full
    a = sampling.illustrate(model, tok, CAPTIONS[:2], [4, 4])
    b = sampling.illustrate(model, tok, CAPTIONS[:1], [4])
    assert np.abs(a[0].astype(int) - b[0].astype(int)).max() <= 1


def test_each_side_of_the_gan_gets_only_its_own_gradient():
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16))
    real = torch.rand(4, 32, 32) * 2 - 1
    fake = (torch.rand(4, 32, 32) * 2 - 1).requires_grad_(True)
    d_loss, g_loss = adversarial_terms(disc, real, fake)
    g_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters()), "the decoder's term must not train D"
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    fake.grad = None
    d_loss.backward()
    assert fake.grad is None, "the discriminator's term must not reach the decoder"
    assert all(p.grad is not None for p in disc.parameters())


def test_diff_augment_is_differentiable_and_per_sample():
    torch.manual_seed(0)
    x = torch.zeros(6, 32, 32, requires_grad=True)
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    flat = y.detach().flatten(1)
    assert len({tuple(r.round(decimals=4).tolist()) for r in flat}) > 1, "augmentations should differ per sample"


def test_training_step_updates_the_discriminator_and_counts_steps(full):
    model, _ = full
    model.train()
    x = torch.rand(4, 64, 64) * 2 - 1
    tokens = torch.randint(4, model.vocab_size, (4, 8))
    out = model(x, tokens)
    assert {"disc", "adversarial", "detail_kl"} <= set(out)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.discriminator.net[0].weight.grad.abs().sum() > 0
    assert int(model.train_steps) == 1
    model.eval()
    assert "disc" not in model(x, tokens), "evaluation losses leave the adversarial game out"


def test_checkpoint_round_trip_keeps_the_new_parts(full, tmp_path):
    model, tok = full
    save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model.config.detail_channels == 4 and loaded.model.config.disc_channels == (16, 32)
    a = sampling.generate(model, tok, [11, 12], steps=5)
    b = sampling.generate(loaded.model, loaded.tokenizer, [11, 12], steps=5)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
