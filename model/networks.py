"""The joint model: image and caption encoders, image and caption decoders around one latent z.

    image ─► ImageEncoder ─┐                      ┌─► ImageDecoder ─► image
                           ├─► product of experts ─► z
    caption ─► CaptionEncoder ┘   (MVAE)          └─► CaptionDecoder (autoregressive) ─► caption
    image-only / caption-only features ─► contrastive heads ─► unit embeddings (alignment = cosine)

The latent prior (model/prior.py) diffuses z itself: a seed's noise is z_dim numbers. The
networks themselves live in model/image_nets.py and model/text_nets.py.

Every op is per-sample (GroupNorm / LayerNorm, never BatchNorm), so a sample's output does not
depend on the rest of its batch. Images are (B, S, S) floats in [-1, 1], paper ≈ +1, ink ≈ -1."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.image_nets import ImageDecoder, ImageEncoder
from model.losses import caption_cross_entropy, gradient_l1, info_nce, kl_to_standard_normal
from model.prior import LatentPrior
from model.text_nets import CaptionDecoder, CaptionEncoder
from model.tokenizer import PAD_ID

Posterior = Literal["mix", "joint", "image", "caption"]
__all__ = ["CaptionDecoder", "CaptionEncoder", "ImageDecoder", "ImageEncoder", "JointModel", "product_of_experts"]


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

    def decode_image(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) -> images (B, S, S) float32 in [-1, 1]."""
        return self.image_decoder(z)

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
        """Joint posterior (mu, logvar) (B, D) each: the prior is fitted on its mean mu."""
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

    def _image_terms(self, logits: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction terms of the decoder's pre-tanh output. `image_bce` (when weighted)
        reads each pixel as ink with probability sigmoid(-2u): unlike L1 through tanh, its
        gradient does not vanish where the decoder has saturated to blank paper, the L1 median
        of sparse line art."""
        recon = torch.tanh(logits)
        out = {"image_l1": (recon - images).abs().mean(), "image_grad": gradient_l1(recon, images)}
        if self.config.loss_weights["image_bce"]:
            ink = (1 - images) / 2  # (B, S, S) in [0, 1]
            out["image_bce"] = F.binary_cross_entropy_with_logits(-2 * logits, ink)
        return out

    def image_loss(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The weighted image terms of `forward` (ModelConfig.loss_weights) for decoder logits
        (B, S, S) against images (B, S, S): what decoder sharpening keeps the decoder faithful to."""
        w = self.config.loss_weights
        return sum(w[k] * v for k, v in self._image_terms(logits, images.float()).items())

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
        feats = self.image_encoder.features(images)
        mu_i, lv_i = self.image_encoder.posterior(feats)
        e_i = F.normalize(self.image_proj(feats).float(), dim=-1)
        mu_c, lv_c, e_c = self.encode_caption(tokens)

        # 1. Which experts each sample keeps: joint (1, 1), image-only (1, 0), caption-only (0, 1).
        m_img, m_cap = self._expert_masks(mode, b, images.device)
        mu, logvar = product_of_experts([mu_i, mu_c], [lv_i, lv_c], [m_img, m_cap])  # (B, D)

        # 2. Reparameterized z (sampled in training, the mean otherwise).
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu

        # 3. Decode both modalities from the same latent.
        u = self.image_decoder.logits(z)
        recon = torch.tanh(u)  # (B, S, S) float32
        logits = self.caption_decoder(z, tokens[:, :-1])  # (B, T-1, V)

        out = self._image_terms(u, images.float())
        out["caption_ce"], acc = caption_cross_entropy(logits.float(), tokens[:, 1:], PAD_ID)
        out["kl"] = kl_to_standard_normal(mu, logvar)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        same_caption = (tokens[:, None, :] == tokens[None, :, :]).all(-1)  # (B, B)
        out["contrastive"] = info_nce(e_i, e_c, scale, same_caption)
        w = cfg.loss_weights
        out["loss"] = sum(w[k] * v for k, v in out.items())
        with torch.no_grad():
            out["image_mse"] = F.mse_loss(recon, images.float())
            out["caption_accuracy"] = acc
            out["latent_mean"] = mu.mean()
            out["latent_std"] = mu.std()
            out["latent_norm"] = mu.norm(dim=-1).mean()
            out["posterior_std"] = torch.exp(0.5 * logvar).mean()
            out["logit_scale"] = scale.detach()
        return out

