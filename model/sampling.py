"""Sampling API used by every job: seeds -> (engraving, caption, alignment), and the conditional modes.

A seed is the identity of a sample: its noise comes from its own
`torch.Generator(device="cpu").manual_seed(seed)` (then moved to the device), every network op is
per-sample, and decoding is greedy (or beam), so a seed gives the same caption and the same image
(within 1/255) alone or inside any batch. Optional temperature / top-k drawing continues the
same per-seed generator, so it is reproducible too. Greedy, drawn and beam decoding all block
degenerate loops: no word right after itself and no repeated 3-gram (model/decoding.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from model.decoding import decode_tokens
from model.images import to_float, to_uint8
from model.networks import JointModel, product_of_experts
from model.tokenizer import CaptionTokenizer


@dataclass
class Samples:
    """A batch of outputs: images uint8 (B, S, S), captions, alignment float32 (B,), latents (B, D)."""

    images: np.ndarray
    captions: list[str]
    alignment: np.ndarray
    z: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))
    seeds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


# -- helpers --------------------------------------------------------------------------------------
Device = Literal["auto", "cpu", "cuda"]


def resolve_device(device: Device | str | torch.device) -> torch.device:
    """The one "auto" rule: CUDA when this process sees a GPU, else the CPU. An explicit "cuda"
    without a GPU is an error naming the fix, not a crash deep inside the first kernel."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but this process sees no GPU (give the actor num_gpus >= 1)")
    return resolved


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity on Linux; the CPU count elsewhere)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity else os.cpu_count() or 1)


def autocast_context(device: torch.device | str, enabled: bool | None = None):
    """bf16 autocast: on by default on CUDA, off on CPU unless enabled=True."""
    device = torch.device(device)
    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


Compile = Literal["off", "default", "reduce-overhead", "max-autotune"]


def compile_model(model: JointModel, mode: Compile) -> None:
    """torch.compile (inductor), in place, the two networks a batch spends most time in: the
    image decoder (its GroupNorm + SiLU + conv chains get fused) and the prior's denoiser (run
    once per DDIM step). "reduce-overhead" adds CUDA graphs on CUDA (on the CPU it is "default").
    Compiling happens on the first call (tens of seconds on a CPU), once per batch shape: keep the
    batch size fixed (pipeline/generation/sampler.generate_seeds pads every call to it). The
    weights and their state_dict names are untouched."""
    if mode == "off":
        return
    for net in (model.image_decoder, model.prior):
        net.compile(mode=None if mode == "default" else mode, dynamic=False)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed: the only source of randomness of a sample."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _randn(generators: list[torch.Generator], dim: int, device: torch.device) -> torch.Tensor:
    """(B, dim) standard normal noise, row i drawn from generators[i]."""
    if not generators:
        return torch.zeros(0, dim, device=device)
    return torch.stack([torch.randn(dim, generator=g) for g in generators]).to(device)


def from_uint8(images: np.ndarray | torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) (or float in [-1, 1]) -> float (B, size, size) in [-1, 1] on device."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dim() == 2:
        x = x[None]
    if x.dim() == 4:  # (B, H, W, C) or (B, C, H, W): average the color channels
        x = x.float().mean(-1) if x.shape[-1] in (1, 3, 4) else x.float().mean(1)
    x = x.to(device)
    x = to_float(x) if x.dtype == torch.uint8 or x.max() > 1.5 else x.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        kw = {} if mode == "area" else {"align_corners": False}
        x = F.interpolate(x[:, None], size=(size, size), mode=mode, **kw)[:, 0]
    return x


def _encode_tokens(tokenizer: CaptionTokenizer, captions: Sequence[str], model: JointModel) -> torch.Tensor:
    return tokenizer.encode(list(captions), model.config.max_caption_tokens).to(model.device)


def _alignment(model: JointModel, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    _, _, e_i = model.encode_image(images)
    _, _, e_c = model.encode_caption(tokens)
    return (e_i.float() * e_c.float()).sum(-1)  # (B,) cosine of unit embeddings


def _prior_sample(model: JointModel, noise: torch.Tensor, steps: int | None) -> torch.Tensor:
    """Per-seed noise x_T (B, z_dim) -> the prior's z (B, z_dim) by DDIM."""
    return model.prior.sample(noise, steps or model.config.ddim_steps)


def _render(
    model: JointModel,
    tokenizer: CaptionTokenizer,
    z: torch.Tensor,
    seeds: list[int],
    *,
    temperature: float,
    top_k: int,
    generators: list[torch.Generator] | None,
    beams: int,
) -> Samples:
    """Decode the prior's z (B, z_dim) into images + captions; score their alignment."""
    images = to_uint8(model.decode_image(z))
    tokens = decode_tokens(
        model, z, temperature=temperature, top_k=top_k, generators=generators, beams=beams,
        punctuation=tokenizer.punctuation_mask(),
    )  # fmt: skip
    captions = tokenizer.decode(tokens)
    x = from_uint8(images, model.config.image_size, model.device)
    align = _alignment(model, x, _encode_tokens(tokenizer, captions, model))
    return Samples(images, captions, align.float().cpu().numpy(), z.float().cpu().numpy(), seeds)


# -- public API -----------------------------------------------------------------------------------
def generate(
    model: JointModel,
    tokenizer: CaptionTokenizer,
    seeds: Sequence[int],
    *,
    device: torch.device | str | None = None,
    steps: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    beams: int = 1,
    autocast: bool | None = None,
) -> Samples:
    """seeds -> prior z (DDIM eta=0) -> engravings uint8 (B, S, S), captions, alignment (B,).

    device: where to run (default: where the model is; the model is moved there).
    steps: DDIM steps (default config.ddim_steps). temperature 0 = greedy (beams > 1: beam search).
    Every decoding blocks repeats: no word right after itself, no repeated 3-gram (decode_tokens).
    autocast: bf16 autocast for the decoders/encoders (default on for CUDA, off on CPU).
    """
    seeds = [int(s) for s in seeds]
    if device is not None:
        model.to(device)
    gens = seed_generators(seeds)
    with _eval_mode(model), autocast_context(model.device, autocast):
        z = _prior_sample(model, _randn(gens, model.config.z_dim, model.device), steps)
        return _render(
            model, tokenizer, z, seeds,
            temperature=temperature, top_k=top_k, generators=gens, beams=beams,
        )  # fmt: skip


def caption(
    model: JointModel,
    tokenizer: CaptionTokenizer,
    images: np.ndarray | torch.Tensor,
    *,
    beams: int = 1,
    autocast: bool | None = None,
) -> list[str]:
    """image -> image-only posterior mean -> greedy (or beam) caption. images uint8 (B, H, W)."""
    with _eval_mode(model), autocast_context(model.device, autocast):
        x = from_uint8(images, model.config.image_size, model.device)
        mu, logvar, _ = model.encode_image(x)
        z, _ = product_of_experts([mu], [logvar])
        return tokenizer.decode(decode_tokens(model, z, beams=beams, punctuation=tokenizer.punctuation_mask()))


def illustrate(
    model: JointModel,
    tokenizer: CaptionTokenizer,
    captions: Sequence[str],
    seeds: Sequence[int],
    *,
    noise_scale: float = 1.0,
    autocast: bool | None = None,
) -> np.ndarray:
    """caption -> caption-only posterior sample (noise from the seed) -> image uint8 (B, S, S).

    The caption fixes the attributes; the seed picks the details the caption leaves open,
    drawn from the caption-only posterior the decoder was trained on (noise_scale 0 = its mean).
    """
    if len(captions) != len(seeds):
        raise ValueError(f"illustrate needs one seed per caption, got {len(captions)} and {len(seeds)}")
    gens = seed_generators(seeds)
    with _eval_mode(model), autocast_context(model.device, autocast):
        mu, logvar, _ = model.encode_caption(_encode_tokens(tokenizer, captions, model))
        mu, logvar = product_of_experts([mu], [logvar])
        noise = _randn(gens, model.config.z_dim, model.device)  # (B, z_dim)
        z = mu + noise_scale * torch.exp(0.5 * logvar) * noise
        return to_uint8(model.decode_image(z))


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of noise vectors a, b (D,) at fractions t (N,) -> (N, D)."""
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return a[None] * (1 - t[:, None]) + b[None] * t[:, None]
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / s


def interpolate(
    model: JointModel,
    tokenizer: CaptionTokenizer,
    seed_a: int,
    seed_b: int,
    steps: int = 8,
    *,
    ddim_steps: int | None = None,
    autocast: bool | None = None,
) -> Samples:
    """`steps` samples between two seeds: slerp of their noise, each mapped by the prior.

    Slerp (not lerp) keeps the noise norm typical of N(0, I), so every point stays where the
    prior was trained; the first and last samples equal generate([seed_a]) and generate([seed_b]).
    """
    steps = max(2, int(steps))
    gens = seed_generators([seed_a, seed_b])
    with _eval_mode(model), autocast_context(model.device, autocast):
        noise = _randn(gens, model.config.z_dim, torch.device("cpu")).double()
        t = torch.linspace(0, 1, steps, dtype=torch.float64)
        path = _slerp(noise[0], noise[1], t).float().to(model.device)  # (N, z_dim)
        path[0], path[-1] = noise[0].float(), noise[1].float()
        z = _prior_sample(model, path, ddim_steps)
        return _render(model, tokenizer, z, [], temperature=0.0, top_k=0, generators=None, beams=1)


def alignment(
    model: JointModel,
    tokenizer: CaptionTokenizer,
    images: np.ndarray | torch.Tensor,
    captions: Sequence[str],
    *,
    autocast: bool | None = None,
) -> np.ndarray:
    """Cosine between the image embedding of each image and the caption embedding of its caption."""
    with _eval_mode(model), autocast_context(model.device, autocast):
        x = from_uint8(images, model.config.image_size, model.device)
        return _alignment(model, x, _encode_tokens(tokenizer, captions, model)).float().cpu().numpy()


def posterior_z(
    model: JointModel,
    images: np.ndarray | torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Posterior mean z of images and/or tokens (either or both), for analysis and tests."""
    with _eval_mode(model):
        x = from_uint8(images, model.config.image_size, model.device) if images is not None else None
        mu, _ = model.posterior(x, tokens.to(model.device) if tokens is not None else None)
        return mu


__all__ = [
    "Samples",
    "alignment",
    "autocast_context",
    "caption",
    "decode_tokens",
    "generate",
    "illustrate",
    "interpolate",
    "posterior_z",
    "seed_generators",
    "to_uint8",
]
