"""The image networks: the convolutional encoder (z posterior, plus the optional spatial detail
latent) and the decoder (z, detail, per-seed noise maps) -> image.

Two optional parts keep what a caption says apart from the detail it leaves open
(`ModelConfig.detail_channels`, `ModelConfig.noise_maps`; both off in the committed default):
  * the **detail latent**: a small spatial Gaussian latent (C x 8 x 8 at the 8 x 8 encoder stage),
    added into the decoder at the same resolution. It carries where the strokes are, which a 64-d
    z cannot; the latent prior diffuses z and detail jointly, so a seed draws both together;
  * **noise maps** (StyleGAN): one N(0, 1) map per decoder stage, scaled per channel (zero-init),
    drawn from the seed's generator at sampling time. They let an adversarial decoder vary
    texture without the latent having to encode it.
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


def detail_stage(cfg: ModelConfig) -> int:
    """Index (in cfg.channels, 4x4 first) of the stage at cfg.detail_size resolution."""
    return {4 * 2**i: i for i in range(len(cfg.channels))}[cfg.detail_size]


class ImageEncoder(nn.Module):
    """(B, S, S) image -> pooled feature (B, F) -> Gaussian (mu, logvar) over z; with
    detail_channels > 0 also a Gaussian over the spatial detail latent (B, C_d, d, d)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = list(reversed(cfg.channels))  # full res ... 4x4
        self.stem = nn.Conv2d(1, ch[0], 3, padding=1)
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
        self.detail_at = len(stages) - 1 - detail_stage(cfg) if cfg.detail_channels else -1
        if cfg.detail_channels:
            c = cfg.channels[detail_stage(cfg)]
            self.detail_head = nn.Conv2d(c, 2 * cfg.detail_channels, 1)

    def features_and_detail(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled feature (B, F) and the detail stage's map (B, C, d, d) (None when disabled)."""
        x = self.stem(images[:, None])  # (B, C_S, S, S)
        detail_map = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == self.detail_at:
                detail_map = x
        x = F.silu(self.out_norm(x)).flatten(1)  # (B, 16 C_0)
        return F.silu(self.fc(x)), detail_map

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_detail(images)[0]

    def posterior(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(feats).float().chunk(2, dim=-1)  # (B, D) each
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def detail_posterior(self, detail_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the detail latent, each (B, C_d, d, d)."""
        mu, logvar = self.detail_head(detail_map).float().chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class ImageDecoder(nn.Module):
    """z (B, D) [+ detail (B, C_d, d, d), noise maps] -> (B, S, S) in [-1, 1], with a gated
    learned plate-texture bank at full resolution."""

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
        self.detail_at = detail_stage(cfg) if cfg.detail_channels else -1
        if cfg.detail_channels:  # zero-init: the detail latent starts as a no-op
            self.detail_in = nn.Conv2d(cfg.detail_channels, ch[self.detail_at], 1)
            nn.init.zeros_(self.detail_in.weight)
            nn.init.zeros_(self.detail_in.bias)
        self.noise_maps = cfg.noise_maps
        if cfg.noise_maps:  # StyleGAN's per-channel noise strengths, zero-init
            self.noise_strength = nn.ParameterList(nn.Parameter(torch.zeros(c, 1, 1)) for c in ch)
        c, k = ch[-1], cfg.texture_bank
        self.k = k
        self.out_norm = nn.GroupNorm(_groups(c), c)
        if k:
            # k learned full-resolution line textures in plate coordinates, and per-pixel gates
            # predicted from the features: the decoder *selects* sharp textures (multiplicative
            # gating) instead of painting 1-px lines with translation-equivariant convs.
            self.textures = nn.Parameter(torch.randn(k, cfg.image_size, cfg.image_size) * 0.5)
            self.gate = nn.Conv2d(c, k, 1)
        self.out = nn.Conv2d(c + k, 1, 3, padding=1)

    def _inject(self, x: torch.Tensor, i: int, detail: torch.Tensor | None, noise: list | None) -> torch.Tensor:
        if str(i) in self.wide:
            x = self.wide[str(i)](x)
        if i == self.detail_at and detail is not None:
            x = x + self.detail_in(detail.to(x.dtype))
        if self.noise_maps and noise is not None:
            x = x + self.noise_strength[i].to(x.dtype) * noise[i].to(x.dtype)
        return x

    def forward(
        self, z: torch.Tensor, detail: torch.Tensor | None = None, noise: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Images (B, S, S) in [-1, 1]: tanh of `logits`."""
        return torch.tanh(self.logits(z, detail, noise))

    def logits(
        self, z: torch.Tensor, detail: torch.Tensor | None = None, noise: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The pre-tanh output u (B, S, S) float32: image = tanh(u), ink probability sigmoid(-2u).
        noise: one (B, 1, s, s) map per stage (4x4 first), or None (no noise: its mean)."""
        b = z.shape[0]
        x = self._inject(self.base(self.fc(z).view(b, self.c0, 4, 4)), 0, detail, noise)  # (B, C_0, 4, 4)
        for i, stage in enumerate(self.stages, start=1):
            x = self._inject(stage(x), i, detail, noise)
        h = F.silu(self.out_norm(x))  # (B, C, S, S)
        if self.k:
            gates = torch.sigmoid(self.gate(h))  # (B, k, S, S)
            h = torch.cat([h, gates * self.textures.to(h.dtype)], dim=1)  # (B, C + k, S, S)
        return self.out(h)[:, 0].float()  # (B, S, S)


def noise_sizes(cfg: ModelConfig) -> list[int]:
    """Side of each decoder noise map, 4x4 first ([] without noise maps)."""
    return [4 * 2**i for i in range(len(cfg.channels))] if cfg.noise_maps else []


def split_noise(flat: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor] | None:
    """(B, sum s^2) per-seed noise -> one (B, 1, s, s) map per stage (None without noise maps)."""
    sizes = noise_sizes(cfg)
    if not sizes:
        return None
    maps, start = [], 0
    for s in sizes:
        maps.append(flat[:, start : start + s * s].reshape(-1, 1, s, s))
        start += s * s
    return maps
