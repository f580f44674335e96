"""Latent prior: a small diffusion model over the shared latent z, sampled with DDIM (eta=0).

The predecessor drew z from N(0, I), where the decoders had never been trained, and got black
images. Here the prior is fitted on the posterior means of the training set, in standardized
space (`fit_latent_stats` stores the mean/std as buffers, so they travel in the checkpoint),
and DDIM with eta=0 turns a seed's Gaussian noise into a z deterministically.

References: DDPM (Ho et al. 2020), improved DDPM cosine schedule (Nichol & Dhariwal 2021),
DDIM (Song et al. 2021, eq. 12).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """alpha_bar(t) for t = 1..T of the cosine schedule (Nichol & Dhariwal 2021, eq. 17)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()  # (T,) index t-1 <-> step t


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.time = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) + self.time(temb)  # (B, W)
        return h + self.fc2(F.silu(self.fc1(x)))


class LatentPrior(nn.Module):
    """eps-prediction residual MLP over standardized z, with a cosine schedule of T steps."""

    def __init__(self, z_dim: int, width: int = 256, depth: int = 3, timesteps: int = 1000) -> None:
        super().__init__()
        self.z_dim, self.width, self.timesteps = z_dim, width, timesteps
        self.inp = nn.Linear(z_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, z_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(timesteps))
        # Standardization of z (set by fit_latent_stats; identity until then).
        self.register_buffer("latent_mean", torch.zeros(z_dim))
        self.register_buffer("latent_std", torch.ones(z_dim))

    # -- standardization ---------------------------------------------------------------------
    @torch.no_grad()
    def fit_latent_stats(self, mu: torch.Tensor, eps: float = 1e-4) -> None:
        """Store the per-dim mean/std of training-set posterior means mu (N, z_dim)."""
        mu = mu.detach().float().to(self.latent_mean.device)
        if mu.dim() != 2 or mu.shape[1] != self.z_dim or mu.shape[0] < 2:
            raise ValueError(f"fit_latent_stats needs (N>=2, {self.z_dim}) latents, got {tuple(mu.shape)}")
        self.latent_mean.copy_(mu.mean(0))
        self.latent_std.copy_(mu.std(0).clamp_min(eps))

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std

    def destandardize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.latent_std + self.latent_mean

    # -- network -----------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict eps from x_t (B, D) at integer steps t (B,) in [0, T)."""
        temb = self.time_mlp(timestep_embedding(t, self.width))  # (B, W)
        h = self.inp(x_t)  # (B, W)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(self.out_norm(h)))  # (B, D)

    def loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM simple loss ||eps - eps_theta(sqrt(ab) x0 + sqrt(1-ab) eps, t)||^2 on standardized z."""
        x0 = self.standardize(z.detach().float())  # (B, D)
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        ab = self.alphas_cumprod[t][:, None]  # (B, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        return F.mse_loss(self.forward(x_t, t).float(), eps)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int = 50, clip: float = 6.0) -> torch.Tensor:
        """DDIM, eta = 0: map noise x_T (B, D) to z (B, D) deterministically.

        Each row is computed independently of the others (MLP + LayerNorm only), so a seed's z
        does not depend on the batch it is in. Runs in fp32 even under autocast: the 50-step
        recursion is cheap and should not accumulate bf16 rounding.
        """
        steps = max(1, min(int(steps), self.timesteps))
        # 1. The sub-sequence tau of timesteps, evenly spaced, descending: T-1 ... 0.
        taus = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        x = noise.float()
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            for i, t in enumerate(taus):
                ab_t = self.alphas_cumprod[t]
                ab_prev = self.alphas_cumprod[taus[i + 1]] if i + 1 < len(taus) else x.new_tensor(1.0)
                tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
                # 2. Predict the noise eps_theta(x_t, t).
                eps = self.forward(x, tt).float()
                # 3. "predicted x_0" of DDIM eq. 12: (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t),
                #    clipped to the range standardized latents actually occupy.
                x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-clip, clip)
                # 4. DDIM eq. 12 with sigma_t = 0 (eta = 0): no fresh noise, the
                #    "direction pointing to x_t" term reuses eps:
                #    x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps.
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        # 5. Back from standardized space to the posterior's z space.
        return self.destandardize(x)
