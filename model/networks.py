"""The joint model: image and caption encoders, image and caption decoders around one latent z.

    image ─► ImageEncoder ─┐                      ┌─► ImageDecoder ─► image
                           ├─► product of experts ─► z
    caption ─► CaptionEncoder ┘   (MVAE)          └─► CaptionDecoder (autoregressive) ─► caption
    image-only / caption-only features ─► contrastive heads ─► unit embeddings (alignment = cosine)

Every op is per-sample (GroupNorm / LayerNorm, never BatchNorm), so a sample's output does not
depend on the rest of its batch. Images are (B, S, S) floats in [-1, 1], paper ≈ +1, ink ≈ -1."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.losses import caption_cross_entropy, gradient_l1, info_nce, kl_to_standard_normal
from model.prior import LatentPrior
from model.tokenizer import BOS_ID, PAD_ID

LOGVAR_MIN, LOGVAR_MAX = -12.0, 6.0
Posterior = Literal["mix", "joint", "image", "caption"]


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


def product_of_experts(
    mus: list[torch.Tensor], logvars: list[torch.Tensor], masks: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian product of N(0, I) and the given experts (each (B, D)); masks (B,) in {0, 1}.

    precision = 1 + sum_i m_i / var_i;  mu = sum_i m_i mu_i / var_i / precision.
    """
    precision = torch.ones_like(mus[0])
    weighted = torch.zeros_like(mus[0])
    for i, (mu, logvar) in enumerate(zip(mus, logvars)):
        p = torch.exp(-logvar)  # (B, D)
        if masks is not None:
            p = p * masks[i][:, None]
        precision = precision + p
        weighted = weighted + mu * p
    return weighted / precision, -torch.log(precision)


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


class ImageEncoder(nn.Module):
    """(B, S, S) image -> pooled feature (B, F) -> Gaussian (mu, logvar) over z."""

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

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images[:, None])  # (B, C_S, S, S)
        x = self.stages(x)  # (B, C_0, 4, 4)
        x = F.silu(self.out_norm(x)).flatten(1)  # (B, 16 C_0)
        return F.silu(self.fc(x))  # (B, F)

    def posterior(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(feats).float().chunk(2, dim=-1)  # (B, D) each
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class ImageDecoder(nn.Module):
    """z (B, D) -> (B, S, S) in [-1, 1], with a gated learned plate-texture bank at full res."""

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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        x = self.fc(z).view(b, self.c0, 4, 4)  # (B, C_0, 4, 4)
        x = self.stages(self.base(x))  # (B, C, S, S)
        h = F.silu(self.out_norm(x))
        if self.k:
            gates = torch.sigmoid(self.gate(h))  # (B, k, S, S)
            h = torch.cat([h, gates * self.textures.to(h.dtype)], dim=1)  # (B, C + k, S, S)
        return torch.tanh(self.out(h)[:, 0].float())  # (B, S, S)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, L, W); key_mask (B, L_k) True = attend; cache = past (k, v) of (B, H, L_past, Dh)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (B,H,L,Dh)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        # With a cache, the new queries are the latest positions: they may see every key.
        is_causal = causal and cache is None and n > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, n, w)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, causal=False, key_mask=None, cache=None):
        a, new_cache = self.attn(self.ln1(x), causal=causal, key_mask=key_mask, cache=cache)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, new_cache


class CaptionEncoder(nn.Module):
    """(B, T) tokens -> bidirectional transformer -> masked mean pool (B, W) -> (mu, logvar)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(vocab_size, w)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(cfg.max_caption_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(
            Block(w, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_encoder_layers)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 2 * cfg.z_dim)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = tokens != PAD_ID  # (B, T)
        x = self.embed(tokens) + self.pos[:t]  # (B, T, W)
        for block in self.blocks:
            x, _ = block(x, key_mask=mask)
        x = self.norm(x)
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)  # (B, W)

    def posterior(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(feats).float().chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class CaptionDecoder(nn.Module):
    """GPT-style causal decoder; z becomes `prefix_tokens` tokens in front of the caption."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        w, p = cfg.text_width, cfg.prefix_tokens
        self.p, self.w, self.max_len = p, w, cfg.max_caption_tokens
        self.prefix = nn.Linear(cfg.z_dim, p * w)
        self.embed = nn.Embedding(vocab_size, w)
        self.pos = nn.Parameter(torch.randn(p + cfg.max_caption_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_layers))
        self.norm = nn.LayerNorm(w)
        self.lm_head = nn.Linear(w, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: a small vocab, fewer params
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2 init: unit-scale logits at start

    def _prefix(self, z: torch.Tensor) -> torch.Tensor:
        return self.prefix(z).view(z.shape[0], self.p, self.w)  # (B, P, W)

    def forward(self, z: torch.Tensor, tokens_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: z (B, D), tokens_in (B, T) = bos w1 ... -> logits (B, T, V)."""
        t = tokens_in.shape[1]
        x = torch.cat([self._prefix(z), self.embed(tokens_in)], dim=1) + self.pos[: self.p + t]  # (B, P+T, W)
        for block in self.blocks:
            x, _ = block(x, causal=True)
        return self.lm_head(self.norm(x[:, self.p :]))  # (B, T, V)

    def start(self, z: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Prefill prefix + bos; returns logits for the first word (B, V) and the KV cache."""
        b = z.shape[0]
        bos = torch.full((b, 1), BOS_ID, dtype=torch.long, device=z.device)
        x = torch.cat([self._prefix(z), self.embed(bos)], dim=1) + self.pos[: self.p + 1]
        cache = []
        for block in self.blocks:
            x, kv = block(x, causal=True)
            cache.append(kv)
        return self.lm_head(self.norm(x[:, -1])), cache

    def step(self, token: torch.Tensor, pos: int, cache: list) -> tuple[torch.Tensor, list]:
        """One decoding step: token (B,) at caption position pos -> logits (B, V), new cache."""
        x = self.embed(token)[:, None] + self.pos[self.p + pos]  # (B, 1, W)
        new_cache = []
        for block, kv in zip(self.blocks, cache):
            x, kv = block(x, cache=kv)
            new_cache.append(kv)
        return self.lm_head(self.norm(x[:, -1])), new_cache


class JointModel(nn.Module):
    """All networks of inkseed; `forward` returns every training loss term and metric."""

    def __init__(self, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        self.image_encoder = ImageEncoder(config)
        self.caption_encoder = CaptionEncoder(config, vocab_size)
        self.image_decoder = ImageDecoder(config)
        self.caption_decoder = CaptionDecoder(config, vocab_size)
        self.image_proj = nn.Linear(config.feature_dim, config.embed_dim)
        self.caption_proj = nn.Linear(config.text_width, config.embed_dim)
        # CLIP's init, temperature 0.07; clamped at 100 in use.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.prior = LatentPrior(config.z_dim, config.prior_width, config.prior_depth, config.prior_timesteps)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # -- encoders ----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, S, S) -> (mu, logvar, unit embedding) of the image expert."""
        f = self.image_encoder.features(images)
        mu, logvar = self.image_encoder.posterior(f)
        return mu, logvar, F.normalize(self.image_proj(f).float(), dim=-1)

    def encode_caption(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, T) -> (mu, logvar, unit embedding) of the caption expert."""
        f = self.caption_encoder.features(tokens)
        mu, logvar = self.caption_encoder.posterior(f)
        return mu, logvar, F.normalize(self.caption_proj(f).float(), dim=-1)

    def posterior(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the product of N(0, I) with whichever experts are given."""
        mus, logvars = [], []
        if images is not None:
            mu, lv, _ = self.encode_image(images)
            mus.append(mu)
            logvars.append(lv)
        if tokens is not None:
            mu, lv, _ = self.encode_caption(tokens)
            mus.append(mu)
            logvars.append(lv)
        if not mus:
            raise ValueError("posterior needs images, tokens or both")
        return product_of_experts(mus, logvars)

    def encode_posterior(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint posterior (mu, logvar) (B, D) each: what the prior is fitted on."""
        return self.posterior(images, tokens)

    # -- prior -------------------------------------------------------------------------------
    def fit_latent_stats(self, mu: torch.Tensor) -> None:
        self.prior.fit_latent_stats(mu)

    def prior_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion loss of the latent prior on latents z (B, D) (standardized inside)."""
        return self.prior.loss(z)

    # -- training ----------------------------------------------------------------------------
    def _expert_masks(self, mode: Posterior, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) float masks of the image and caption experts for a posterior mode ("mix" draws
        joint / image-only / caption-only per sample with config.posterior_mix)."""
        if mode == "mix":
            choice = torch.multinomial(
                torch.tensor(self.config.posterior_mix, device=device), b, replacement=True
            )  # (B,) 0 joint, 1 image, 2 caption
        else:
            choice = torch.full((b,), {"joint": 0, "image": 1, "caption": 2}[mode], device=device)
        return (choice != 2).float(), (choice != 1).float()

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, posterior: Posterior | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss terms and metrics for a batch: images (B, S, S) in [-1, 1], tokens (B, T).

        posterior: "mix" (default in training) draws per sample the joint, image-only or
        caption-only posterior with config.posterior_mix and samples z; "joint" / "image" /
        "caption" use that one; outside training the default is "joint" with z = mu.
        """
        cfg = self.config
        b = images.shape[0]
        mode = posterior or ("mix" if self.training else "joint")
        mu_i, lv_i, e_i = self.encode_image(images)
        mu_c, lv_c, e_c = self.encode_caption(tokens)

        # 1. Which experts each sample keeps: joint (1, 1), image-only (1, 0), caption-only (0, 1).
        m_img, m_cap = self._expert_masks(mode, b, images.device)
        mu, logvar = product_of_experts([mu_i, mu_c], [lv_i, lv_c], [m_img, m_cap])  # (B, D)

        # 2. Reparameterized z (sampled in training, the mean otherwise).
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu

        # 3. Decode both modalities from the same z.
        recon = self.image_decoder(z)  # (B, S, S) float32
        logits = self.caption_decoder(z, tokens[:, :-1])  # (B, T-1, V)
        target = tokens[:, 1:]

        images = images.float()
        out: dict[str, torch.Tensor] = {}
        out["image_l1"] = (recon - images).abs().mean()
        out["image_grad"] = gradient_l1(recon, images)
        out["caption_ce"], acc = caption_cross_entropy(logits.float(), target, PAD_ID)
        kl, kl_loss = kl_to_standard_normal(mu, logvar, cfg.free_bits)
        out["kl"] = kl
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        same_caption = (tokens[:, None, :] == tokens[None, :, :]).all(-1)  # (B, B)
        out["contrastive"] = info_nce(e_i, e_c, scale, same_caption)
        w = cfg.loss_weights
        out["loss"] = (
            w["image_l1"] * out["image_l1"]
            + w["image_grad"] * out["image_grad"]
            + w["caption_ce"] * out["caption_ce"]
            + w["kl"] * kl_loss
            + w["contrastive"] * out["contrastive"]
        )
        with torch.no_grad():
            out["image_mse"] = F.mse_loss(recon, images)
            out["caption_accuracy"] = acc
            out["latent_mean"] = mu.mean()
            out["latent_std"] = mu.std()
            out["latent_norm"] = mu.norm(dim=-1).mean()
            out["posterior_std"] = torch.exp(0.5 * logvar).mean()
            out["logit_scale"] = scale.detach()
        return out
