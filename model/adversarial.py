"""The adversarial pieces of the decoder-sharpening training phase
(pipeline/training/sharpen_phase.py): a PatchGAN discriminator (VQGAN), hinge losses, and
DiffAugment (Zhao et al. 2020) so a small dataset does not let it memorize.

They are not part of JointModel (nor of its model.safetensors): the sharpening phase holds the
discriminator and gives it its own optimizer. `adversarial_terms` still keeps each side's
gradient to its own parameters (the discriminator's loss sees the fake images detached; the
decoder's loss goes through the discriminator with its weights detached, by
`torch.func.functional_call`), so the two losses may be summed or stepped in either order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.image_nets import _groups


class PatchDiscriminator(nn.Module):
    """(B, S, S) in [-1, 1] -> (B, 1, S/2^n, S/2^n) realness logits of overlapping patches."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i, c in enumerate(channels):
            layers.append(nn.Conv2d(cin, c, 4, stride=2, padding=1))
            if i:  # no norm on the first layer (pix2pix)
                layers.append(nn.GroupNorm(_groups(c), c))
            layers.append(nn.LeakyReLU(0.2))
            cin = c
        layers.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images[:, None])


def diff_augment(x: torch.Tensor) -> torch.Tensor:
    """DiffAugment's color, translation (1/8) and cutout (1/2) policies, differentiable, drawn
    independently per sample. x (B, S, S) in [-1, 1]."""
    b, s, _ = x.shape
    dev, dt = x.device, x.dtype
    # 1. Brightness and contrast (grayscale "color").
    x = x + (torch.rand(b, 1, 1, device=dev, dtype=dt) - 0.5)
    mean = x.mean(dim=(1, 2), keepdim=True)
    x = (x - mean) * (torch.rand(b, 1, 1, device=dev, dtype=dt) + 0.5) + mean
    # 2. Translation by up to s/8 pixels, padding with paper (+1).
    shift = s // 8
    pad = F.pad(x[:, None], (shift, shift, shift, shift), value=1.0)[:, 0]  # (B, S+2p, S+2p)
    dx = torch.randint(0, 2 * shift + 1, (b,), device=dev)
    dy = torch.randint(0, 2 * shift + 1, (b,), device=dev)
    ar = torch.arange(s, device=dev)
    rows = (dy[:, None] + ar[None]).clamp(max=pad.shape[1] - 1)  # (B, S)
    cols = (dx[:, None] + ar[None]).clamp(max=pad.shape[2] - 1)
    x = pad[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    # 3. Cutout: one (s/2)^2 square per sample set to 0.
    half = s // 2
    cy = torch.randint(0, s + 1 - half, (b, 1, 1), device=dev)
    cx = torch.randint(0, s + 1 - half, (b, 1, 1), device=dev)
    r, c = ar[None, :, None], ar[None, None, :]
    inside = (r >= cy) & (r < cy + half) & (c >= cx) & (c < cx + half)  # (B, S, S)
    return x * (~inside).to(dt)


def adversarial_terms(
    disc: PatchDiscriminator,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    augment: bool = True,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator hinge loss, decoder hinge loss) on real and fake images (B, S, S), each
    DiffAugment-ed unless augment=False.

    The discriminator loss runs `forward` (default `disc`; under DDP its wrapper, so that gradient
    is averaged across workers) once, on the real images and `fake` detached; the decoder loss
    goes through `disc` with detached weights. Optimizing their sum trains each side on its own
    term only."""
    real_aug, fake_aug = (diff_augment(real.float()), diff_augment(fake.float())) if augment else (real.float(), fake.float())
    logits = (forward or disc)(torch.cat([real_aug, fake_aug.detach()]))  # one forward: (B_r + B_f, 1, s, s)
    d_loss = F.relu(1 - logits[: len(real_aug)]).mean() + F.relu(1 + logits[len(real_aug) :]).mean()
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    g_loss = -torch.func.functional_call(disc, frozen, (fake_aug,)).mean()
    return d_loss, g_loss
