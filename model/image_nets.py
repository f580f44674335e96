"""The image networks: the convolutional encoder (image -> Gaussian posterior over z) and the
decoder (z -> image), with optional wide residual blocks after the decoder's stages
(`ModelConfig.decoder_widths`), an optional sub-pixel output (`ModelConfig.pixel_shuffle`) and a
gated plate-texture bank at full resolution.
Every op is per sample (GroupNorm), so a sample does not depend on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig

LOGVAR_MIN, LOGVAR_MAX = -12.0, 6.0


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """x + conv3x3(silu(gn(x))): the residual conv of each stage (zero-init: starts as identity)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(c), c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(self.norm(x)))


class WideBlock(nn.Module):
    """x + conv3x3(silu(gn(conv3x3(silu(gn(x)))))) through `width` hidden channels; the last conv
    is zero-init, so the block starts as the identity (ModelConfig.decoder_widths)."""

    def __init__(self, c: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, width, 3, padding=1),
            nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, c, 3, padding=1),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ImageEncoder(nn.Module):
    """(B, S, S) image -> pooled feature (B, F) -> Gaussian (mu, logvar) over z."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = list(reversed(cfg.channels))  # image_size / r ... 4x4
        self.r = cfg.pixel_shuffle
        self.stem = nn.Conv2d(self.r**2, ch[0], 3, padding=1)
        stages = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            stages.append(
                nn.Sequential(
                    nn.GroupNorm(_groups(cin), cin),
                    nn.SiLU(),
                    nn.Conv2d(cin, cout, 3, stride=2, padding=1),  # halve resolution
                    ResBlock(cout),
                )
            )
        self.stages = nn.Sequential(*stages)
        self.out_norm = nn.GroupNorm(_groups(ch[-1]), ch[-1])
        self.fc = nn.Linear(ch[-1] * 16, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, 2 * cfg.z_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, S, S) -> pooled feature (B, F)."""
        x = F.pixel_unshuffle(images[:, None], self.r) if self.r > 1 else images[:, None]  # (B, r^2, S/r, S/r)
        x = self.stages(self.stem(x))  # (B, C_0, 4, 4)
        x = F.silu(self.out_norm(x)).flatten(1)  # (B, 16 C_0)
        return F.silu(self.fc(x))

    def posterior(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(feats).float().chunk(2, dim=-1)  # (B, D) each
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class ImageDecoder(nn.Module):
    """z (B, D) -> (B, S, S) in [-1, 1], with a gated learned plate-texture bank at full resolution."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = list(cfg.channels)  # 4x4 ... full res
        self.c0 = ch[0]
        self.fc = nn.Linear(cfg.z_dim, ch[0] * 16)
        self.base = ResBlock(ch[0])
        stages = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            stages.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(cin, cout, 3, padding=1),
                    nn.GroupNorm(_groups(cout), cout),
                    nn.SiLU(),
                    ResBlock(cout),
                )
            )
        self.stages = nn.Sequential(*stages)
        # Keyed by stage index (4x4 = "0"), so the stages' own weight names do not change.
        self.wide = nn.ModuleDict({str(i): WideBlock(c, w) for i, (c, w) in enumerate(zip(ch, cfg.decoder_widths)) if w})
        c, k, r = ch[-1], cfg.texture_bank, cfg.pixel_shuffle
        self.k, self.r = k, r
        self.out_norm = nn.GroupNorm(_groups(c), c)
        if k:
            # k learned full-resolution line textures in plate coordinates, and per-pixel gates
            # predicted from the features: the decoder *selects* sharp textures (multiplicative
            # gating) instead of painting 1-px lines with translation-equivariant convs.
            self.textures = nn.Parameter(torch.randn(k, cfg.image_size, cfg.image_size) * 0.5)
            self.gate = nn.Conv2d(c, k * r * r, 1)
        # r = 1: one 3x3 conv over the features and the gated textures at full resolution.
        # r > 1: a 3x3 conv predicts each position's r x r pixels (pixel shuffle), and the gated
        # textures are added to those logits (their own learned maps carry any weighting).
        self.out = nn.Conv2d(c + k, 1, 3, padding=1) if r == 1 else nn.Conv2d(c, r * r, 3, padding=1)

    def _widen(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Stage i's wide block (decoder_widths), if it has one."""
        return self.wide[str(i)](x) if str(i) in self.wide else x

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, S, S) in [-1, 1]: tanh of `logits`."""
        return torch.tanh(self.logits(z))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The pre-tanh output u (B, S, S) float32: image = tanh(u), ink probability sigmoid(-2u)."""
        b = z.shape[0]
        x = self._widen(self.base(self.fc(z).view(b, self.c0, 4, 4)), 0)  # (B, C_0, 4, 4)
        for i, stage in enumerate(self.stages, start=1):
            x = self._widen(stage(x), i)  # (B, C_i, 4 2^i, 4 2^i)
        h = F.silu(self.out_norm(x))  # (B, C, S/r, S/r)
        if self.r > 1:
            u = F.pixel_shuffle(self.out(h), self.r)  # (B, 1, S, S)
            if self.k:
                gates = torch.sigmoid(F.pixel_shuffle(self.gate(h), self.r))  # (B, k, S, S)
                u = u + (gates * self.textures.to(h.dtype)).sum(1, keepdim=True)
            return u[:, 0].float()  # (B, S, S)
        if self.k:
            gates = torch.sigmoid(self.gate(h))  # (B, k, S, S)
            h = torch.cat([h, gates * self.textures.to(h.dtype)], dim=1)  # (B, C + k, S, S)
        return self.out(h)[:, 0].float()  # (B, S, S)

