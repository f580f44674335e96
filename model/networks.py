"""The joint model: image and caption encoders, image and caption decoders around one latent z.

    image ─► ImageEncoder ─┐                      ┌─► ImageDecoder ─► image
                           ├─► product of experts ─► z
    caption ─► CaptionEncoder ┘   (MVAE)          └─► CaptionDecoder (autoregressive) ─► caption
    image-only / caption-only features ─► contrastive heads ─► unit embeddings (alignment = cosine)

Optional parts (model/image_nets.py, model/adversarial.py; off in the committed default): a
spatial detail latent beside z, which the latent prior diffuses jointly with z; per-seed noise
maps in the decoder; a PatchGAN term on the reconstruction. The networks themselves live in
model/image_nets.py and model/text_nets.py.

Every op is per-sample (GroupNorm / LayerNorm, never BatchNorm), so a sample's output does not
depend on the rest of its batch. Images are (B, S, S) floats in [-1, 1], paper ≈ +1, ink ≈ -1."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.adversarial import PatchDiscriminator, adversarial_terms
from model.config import ModelConfig
from model.image_nets import ImageDecoder, ImageEncoder, noise_sizes, split_noise
from model.losses import caption_cross_entropy, gradient_l1, info_nce, kl_to_standard_normal
from model.prior import LatentPrior
from model.text_nets import CaptionDecoder, CaptionEncoder
from model.tokenizer import PAD_ID

Posterior = Literal["mix", "joint", "image", "caption"]
__all__ = ["CaptionDecoder", "CaptionEncoder", "ImageDecoder", "ImageEncoder", "JointModel", "product_of_experts", "widen_decoder"]


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
        self.prior = LatentPrior(self.latent_dim, config.prior_width, config.prior_depth, config.prior_timesteps)
        if config.disc_channels:
            self.discriminator = PatchDiscriminator(config.disc_channels)
            # Training forwards seen; the decoder's adversarial term starts at adversarial_start.
            self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    @property
    def detail_shape(self) -> tuple[int, int, int]:
        """(C, d, d) of the spatial detail latent ((0, d, d) when disabled)."""
        return (self.config.detail_channels, self.config.detail_size, self.config.detail_size)

    @property
    def latent_dim(self) -> int:
        """Size of what the prior diffuses: z, then the flattened detail latent."""
        c, d, _ = self.detail_shape
        return self.config.z_dim + c * d * d

    @property
    def noise_dim(self) -> int:
        """Standard-normal numbers a seed draws: the prior's x_T, then the decoder's noise maps."""
        return self.latent_dim + sum(s * s for s in noise_sizes(self.config))

    def split_latent(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, latent_dim) -> z (B, z_dim), detail (B, C, d, d) or None."""
        z = latent[:, : self.config.z_dim]
        if not self.config.detail_channels:
            return z, None
        return z, latent[:, self.config.z_dim :].reshape(-1, *self.detail_shape)

    def decode_image(
        self, z: torch.Tensor, detail: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z (B, z_dim) [+ detail (B, C, d, d); missing = its prior mean 0] [+ flat decoder noise
        (B, noise_dim - latent_dim); missing = 0] -> images (B, S, S) float32 in [-1, 1]."""
        return self.image_decoder(z, detail, split_noise(noise, self.config) if noise is not None else None)

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

    def prior_latents(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What the prior is fitted on: the joint posterior mean of z, then the image's detail
        latent mean, flattened: (B, latent_dim)."""
        mu, _ = self.posterior(images, tokens)
        if not self.config.detail_channels:
            return mu
        _, detail_map = self.image_encoder.features_and_detail(images)
        mu_d, _ = self.image_encoder.detail_posterior(detail_map)
        return torch.cat([mu, mu_d.flatten(1)], dim=1)

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

    def _detail(self, detail_map: torch.Tensor | None, m_img: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The detail latent a training sample decodes (sampled; its mean outside training; 0,
        the prior mean, where the image expert is dropped) and its KL (0 when disabled)."""
        if detail_map is None:
            return None, m_img.new_zeros(())
        mu, logvar = self.image_encoder.detail_posterior(detail_map)  # (B, C, d, d) each
        kl, _ = kl_to_standard_normal(mu.flatten(1), logvar.flatten(1))
        d = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return d * m_img[:, None, None, None], kl

    def _image_terms(self, logits: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstruction terms of the decoder's pre-tanh output, plus the hinge terms when the
        model has a discriminator. `image_bce` (when weighted) reads each pixel as ink with
        probability sigmoid(-2u): unlike L1 through tanh, its gradient does not vanish where the
        decoder has saturated to blank paper, the L1 median of sparse line art."""
        recon = torch.tanh(logits)
        out = {"image_l1": (recon - images).abs().mean(), "image_grad": gradient_l1(recon, images)}
        if self.config.loss_weights["image_bce"]:
            ink = (1 - images) / 2  # (B, S, S) in [0, 1]
            out["image_bce"] = F.binary_cross_entropy_with_logits(-2 * logits, ink)
        if self.config.disc_channels and self.training:
            out["disc"], g_loss = adversarial_terms(self.discriminator, images, recon)
            self.train_steps += 1
            out["adversarial"] = g_loss * (self.train_steps > self.config.adversarial_start).float()
        return out

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
        feats, detail_map = self.image_encoder.features_and_detail(images)
        mu_i, lv_i = self.image_encoder.posterior(feats)
        e_i = F.normalize(self.image_proj(feats).float(), dim=-1)
        mu_c, lv_c, e_c = self.encode_caption(tokens)

        # 1. Which experts each sample keeps: joint (1, 1), image-only (1, 0), caption-only (0, 1).
        m_img, m_cap = self._expert_masks(mode, b, images.device)
        mu, logvar = product_of_experts([mu_i, mu_c], [lv_i, lv_c], [m_img, m_cap])  # (B, D)

        # 2. Reparameterized z and detail (sampled in training, the means otherwise), and fresh
        #    decoder noise maps in training (none, i.e. their mean, otherwise).
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        detail, out_kl_detail = self._detail(detail_map, m_img)
        noise = torch.randn(b, self.noise_dim - self.latent_dim, device=z.device) if cfg.noise_maps and self.training else None

        # 3. Decode both modalities from the same latent.
        u = self.image_decoder.logits(z, detail, split_noise(noise, cfg) if noise is not None else None)
        recon = torch.tanh(u)  # (B, S, S) float32
        logits = self.caption_decoder(z, tokens[:, :-1])  # (B, T-1, V)

        out = self._image_terms(u, images.float())
        out["caption_ce"], acc = caption_cross_entropy(logits.float(), tokens[:, 1:], PAD_ID)
        out["kl"], kl_loss = kl_to_standard_normal(mu, logvar, cfg.free_bits)
        if cfg.detail_channels:
            out["detail_kl"] = out_kl_detail
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        same_caption = (tokens[:, None, :] == tokens[None, :, :]).all(-1)  # (B, B)
        out["contrastive"] = info_nce(e_i, e_c, scale, same_caption)
        w = cfg.loss_weights
        optimized = {**out, "kl": kl_loss}  # "disc" (the discriminator's own loss) has weight 1
        out["loss"] = sum(w.get(k, 1.0) * v for k, v in optimized.items())
        with torch.no_grad():
            out["image_mse"] = F.mse_loss(recon, images.float())
            out["caption_accuracy"] = acc
            out["latent_mean"] = mu.mean()
            out["latent_std"] = mu.std()
            out["latent_norm"] = mu.norm(dim=-1).mean()
            out["posterior_std"] = torch.exp(0.5 * logvar).mean()
            out["logit_scale"] = scale.detach()
        return out


def widen_decoder(model: JointModel, widths: tuple[int, ...] | list[int]) -> JointModel:
    """A copy of `model` with ModelConfig.decoder_widths = widths: every trained weight copied, the
    new wide blocks zero-init, so it starts as exactly the same function (fine-tune it from there:
    benchmarks/sharpen_decoder.py --decoder-widths)."""
    wide = JointModel(model.config.replace(decoder_widths=tuple(widths)), model.vocab_size)
    missing, unexpected = wide.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("image_decoder.wide.") for k in missing):
        raise ValueError(f"{list(widths)} changes more than the wide blocks: {unexpected[:3]} {missing[:3]}")
    return wide.to(model.device).train(model.training)
