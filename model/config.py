"""Model configuration: one typed dataclass and the named size presets.

`PRESETS["tiny"]` is for tests (trains in seconds on CPU), `PRESETS["base"]` is the embedded
default (128 px; the committed checkpoint trained on a 2-core CPU in under two hours),
`PRESETS["large"]` is for H100 clusters.
The preset name is the command-line key (`jobs.train --preset base`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar


def _default_loss_weights() -> dict[str, float]:
    return {
        # Per-pixel L1 is the main reconstruction term: L1 keeps edges sharper than MSE.
        "image_l1": 1.0,
        # Per-pixel binary cross-entropy of ink (image_nets: ink probability sigmoid(-2u) of the
        # pre-tanh output u). 0 here: the hatched engravings are half ink. Sparse line art needs
        # it: there L1 through tanh saturates to blank paper (the median) and stops learning.
        "image_bce": 0.0,
        # L1 on x/y finite differences: hatching is 1-2 px lines, whose gradients L1 alone
        # under-weights; this term is what keeps lines from averaging to gray.
        "image_grad": 1.0,
        # Captions are easy (CE reaches ~1e-4 quickly); weight 1 is plenty.
        "caption_ce": 1.0,
        # beta of the VAE: small, so z keeps the detail the decoders need; the fitted
        # prior (not N(0, I)) is what makes seeds land where the decoders were trained.
        "kl": 1e-3,
        # InfoNCE between the image-only and caption-only encodings: ties the two
        # posteriors together and gives the alignment score; kept below reconstruction.
        "contrastive": 0.1,
    }


T = TypeVar("T")


def from_fields(cls: type[T], d: dict[str, Any]) -> T:
    """A config dataclass from a dict of its field names; an unknown name is an error that lists
    the known ones (a typo in a YAML file or a checkpoint from other code)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)


def stages_for(image_size: int) -> int:
    """x2 upsampling stages from the decoder's 4x4 start to image_size (a power of two >= 8)."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return int(round(math.log2(image_size / 4)))


@dataclass
class ModelConfig:
    """Every size and weight of the joint model. Serialized into the checkpoint's config.json."""

    # Side of the square grayscale image, a power of two >= 8 (tiny 64, base 128, large 512).
    image_size: int = 128
    # Shared latent size: 64 was enough in the prototype for ~6 discrete attributes plus layout.
    z_dim: int = 64
    # Conv channels from the 4x4 base up to full resolution: len == log2(image_size / 4) + 1.
    # A 3x3 conv costs 9 C_in C_out S^2, so the high-resolution stages are kept narrow:
    # ~0.69 GMAC (1.4 GFLOP) per training sample at 128 px: ~75 samples/s (bf16) on 2 idle
    # CPU cores, ~4 min per epoch of 18K images; the texture bank carries the full-resolution
    # hatching that 8 channels alone could not paint. (256, 160, 96, 48, 24, 12) costs 2x for more capacity.
    channels: tuple[int, ...] = (128, 128, 64, 32, 16, 8)
    # Hidden width of a wide residual block after each decoder stage (4x4 first, as `channels`;
    # 0 = none there; () = none at all). GN, SiLU, 3x3 conv C -> W, GN, SiLU, 3x3 conv W -> C
    # (the last conv zero-init, so each block starts as the identity): capacity at the
    # 32-128 px stages, where the narrow `channels` lose a subject's fine parts, at a cost of
    # 18 C W S^2 MAC per stage instead of widening every conv of the stage. Chosen with the
    # other sizes before training starts.
    decoder_widths: tuple[int, ...] = ()
    # Sub-pixel factor r of both image networks (ESPCN's pixel shuffle): the decoder's last conv
    # stage runs at image_size / r and one conv predicts the r x r pixels (and texture gates) of
    # each position; the encoder starts with the inverse (pixel unshuffle). 1 = convs at full
    # resolution. The full-resolution stages of a few channels are memory-bound on CPUs (about
    # a fifth of the matmul peak): r = 4 with channels (128, 128, 96, 64) trains 1.67x as many
    # 128 px samples/s at a lower one-epoch loss (docs/quality.md); configs/default.yaml uses it.
    pixel_shuffle: int = 1
    # Learned full-resolution "plate texture" maps the decoder gates into its last stage:
    # hatching sits at fixed plate coordinates, which translation-equivariant convs cannot
    # place sharply by themselves. 0 disables.
    texture_bank: int = 8
    # Width of the caption transformers (encoder and decoder) and of the contrastive input.
    text_width: int = 128
    # Caption decoder depth; captions come from a small grammar, 2 layers suffice.
    text_layers: int = 2
    # Caption encoder depth (bidirectional).
    text_encoder_layers: int = 2
    # Attention heads in both caption transformers (head dim = text_width / text_heads).
    text_heads: int = 4
    # Token budget per caption incl. bos and eos: grammar captions are <= 28 tokens.
    max_caption_tokens: int = 32
    # z becomes this many prefix tokens every caption position attends to.
    prefix_tokens: int = 4
    # Width of the pooled image feature and of the contrastive embedding.
    feature_dim: int = 256
    embed_dim: int = 64
    # Diffusion prior over z: residual-MLP width and number of residual blocks. The latents of
    # ~2,900 discrete scenes form clusters; a prior that blurs between them gives seeds whose
    # image and caption disagree, so it gets more capacity than its tiny input suggests
    # (384 x 4: 3.3M params, ~2.7 ms per seed for 50 DDIM steps on a CPU core).
    prior_width: int = 384
    prior_depth: int = 4
    # Diffusion training steps (cosine schedule) and default DDIM sampling steps.
    prior_timesteps: int = 1000
    ddim_steps: int = 50
    # Probability that a training sample uses the joint, image-only or caption-only
    # posterior (MVAE-style sub-sampling), so captioning and illustrating decode well too.
    posterior_mix: tuple[float, float, float] = (0.5, 0.25, 0.25)
    # Dropout in the caption transformers: the data are procedural and plentiful, so 0.
    dropout: float = 0.0
    # Loss weights (see _default_loss_weights for why each).
    loss_weights: dict[str, float] = field(default_factory=_default_loss_weights)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.decoder_widths = tuple(int(c) for c in self.decoder_widths)
        self.posterior_mix = tuple(float(p) for p in self.posterior_mix)  # type: ignore[assignment]
        weights = _default_loss_weights()
        weights.update({k: float(v) for k, v in dict(self.loss_weights).items()})
        self.loss_weights = weights
        self.validate()

    @property
    def num_stages(self) -> int:
        """Number of x2 conv stages between 4x4 and the last conv resolution (image_size / r)."""
        return stages_for(self.image_size // self.pixel_shuffle)

    def with_image_size(self, size: int) -> ModelConfig:
        """This config at another image size: stages are dropped from the small end's list,
        or added at half the last stage's channels (at least 8) for a larger image."""
        if size == self.image_size:
            return self
        n = stages_for(size // self.pixel_shuffle) + 1
        ch, wide = list(self.channels[:n]), list(self.decoder_widths[:n])
        while len(ch) < n:
            ch.append(max(8, ch[-1] // 2))
        while wide and len(wide) < n:
            wide.append(max(8, wide[-1] // 2))
        return self.replace(image_size=size, channels=tuple(ch), decoder_widths=tuple(wide))

    def validate(self) -> None:
        s, r = self.image_size, self.pixel_shuffle
        if r < 1 or r & (r - 1) or s // r < 8:
            raise ValueError(f"pixel_shuffle must be a power of two with image_size / pixel_shuffle >= 8, got {r}")
        if len(self.channels) != stages_for(s // r) + 1:
            raise ValueError(
                f"channels needs log2({s}/{r}/4)+1 = {self.num_stages + 1} entries, got {len(self.channels)}"
            )
        if self.decoder_widths and (len(self.decoder_widths) != len(self.channels) or min(self.decoder_widths) < 0):
            raise ValueError(f"decoder_widths needs one width >= 0 per entry of channels ({len(self.channels)}), "
                             f"or none, got {list(self.decoder_widths)}")
        if self.text_width % self.text_heads:
            raise ValueError("text_width must be divisible by text_heads")
        if len(self.posterior_mix) != 3 or abs(sum(self.posterior_mix) - 1.0) > 1e-6:
            raise ValueError(f"posterior_mix must be 3 probabilities summing to 1, got {self.posterior_mix}")
        unknown = set(self.loss_weights) - set(_default_loss_weights())
        if unknown:
            raise ValueError(f"unknown loss weight(s): {sorted(unknown)}")
        if self.max_caption_tokens < 3:
            raise ValueError("max_caption_tokens must be >= 3 (bos, a word, eos)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["posterior_mix"] = list(self.posterior_mix)
        d["decoder_widths"] = list(self.decoder_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_fields(cls, d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})


# The preset names, for command lines and type checks; PRESETS holds one config per name.
PresetName = Literal["tiny", "base", "large"]
PRESETS: dict[str, ModelConfig] = {
    # Tests: 64 px, narrow; a few seconds of CPU training overfits 64 samples.
    "tiny": ModelConfig(
        image_size=64,
        z_dim=32,
        channels=(128, 64, 32, 16, 8),
        texture_bank=4,
        text_width=64,
        text_layers=2,
        text_encoder_layers=1,
        text_heads=2,
        prefix_tokens=2,
        feature_dim=128,
        embed_dim=32,
        prior_width=128,
        prior_depth=2,
        ddim_steps=20,
    ),
    # The embedded default (== the dataclass defaults): 128 px, ~4 min per epoch on 2 CPU
    # cores (see the `channels` comment).
    "base": ModelConfig(),
    # H100 clusters: 512 px, z 256, wide channels and a deeper text stack.
    "large": ModelConfig(
        image_size=512,
        z_dim=256,
        channels=(512, 512, 384, 256, 192, 128, 64, 32),
        texture_bank=16,
        text_width=512,
        text_layers=6,
        text_encoder_layers=4,
        text_heads=8,
        prefix_tokens=8,
        feature_dim=1024,
        embed_dim=256,
        prior_width=1024,
        prior_depth=6,
        # The real-data design of issue 13 (docs/quality.md, the OpenMoji ablation): today's
        # decoder trained with the ink cross-entropy instead of L1 + gradient L1.
        loss_weights={"image_l1": 0.0, "image_grad": 0.0, "image_bce": 1.0},
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (mutating it never changes PRESETS)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
