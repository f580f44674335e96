"""model/adversarial.py, the pieces of the decoder-sharpening phase: the PatchGAN's patch grid,
each side of the adversarial game getting only its own gradient, DiffAugment per sample."""

from __future__ import annotations

import pytest
import torch

from model.adversarial import PatchDiscriminator, adversarial_terms, diff_augment

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_discriminator_scores_overlapping_patches():
    disc = PatchDiscriminator((8, 16, 32))
    assert disc(torch.zeros(3, 64, 64)).shape == (3, 1, 8, 8)  # one logit per patch: 64 / 2^3


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


def test_the_summed_terms_give_each_side_its_own_terms_gradient():
    """Backpropagating d_loss + g_loss once (then stepping each side's own optimizer) gives D the
    gradient of its hinge loss alone and the fake images that of the decoder's loss alone."""
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16))
    real = torch.rand(4, 32, 32) * 2 - 1
    fake = torch.nn.Parameter(torch.rand(4, 32, 32) * 2 - 1)
    torch.manual_seed(1)  # each call below draws the same augmentations
    d_loss, g_loss = adversarial_terms(disc, real, fake)
    (d_loss + g_loss).backward()
    d_grads = [p.grad.clone() for p in disc.parameters()]
    fake_grad = fake.grad.clone()
    for p in [*disc.parameters(), fake]:
        p.grad = None
    torch.manual_seed(1)
    d_only, _ = adversarial_terms(disc, real, fake)
    d_only.backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(d_grads, disc.parameters()))
    for p in [*disc.parameters(), fake]:
        p.grad = None
    torch.manual_seed(1)
    _, g_only = adversarial_terms(disc, real, fake)
    g_only.backward()
    assert torch.allclose(fake_grad, fake.grad)


def test_diff_augment_is_differentiable_and_per_sample():
    torch.manual_seed(0)
    x = torch.zeros(6, 32, 32, requires_grad=True)
    y = diff_augment(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    flat = y.detach().flatten(1)
    assert len({tuple(r.round(decimals=4).tolist()) for r in flat}) > 1, "augmentations should differ per sample"


def test_without_augmentation_the_terms_are_deterministic_and_forward_runs_the_discriminator_once():
    """augment=False scores the images as given; `forward` (a DDP wrapper in the sharpening
    phase) runs D once, on real and fake together, and D's gradient comes through it."""
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16))
    real, fake = torch.rand(3, 32, 32) * 2 - 1, torch.rand(2, 32, 32) * 2 - 1
    calls = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return disc(x)

    torch.manual_seed(1)
    d_a, g_a = adversarial_terms(disc, real, fake, augment=False, forward=forward)
    torch.manual_seed(2)
    d_b, g_b = adversarial_terms(disc, real, fake, augment=False)
    assert calls == [5] and torch.allclose(d_a, d_b) and torch.allclose(g_a, g_b)
    expected = torch.relu(1 - disc(real)).mean() + torch.relu(1 + disc(fake)).mean()
    assert torch.allclose(d_a, expected, atol=1e-6)
    d_a.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())

