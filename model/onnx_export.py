"""ONNX export of a checkpoint (`python -m jobs.export --format onnx`), and its parity check.

The export folder holds one graph per network `generate()` runs, every one with a dynamic batch axis:

    prior_denoiser.onnx    x_t (B, z_dim), t (B,) int64 -> eps (B, z_dim)
    image_decoder.onnx     z (B, z_dim) -> image (B, S, S) in [-1, 1]
    caption_start.onnx     z (B, z_dim) -> logits (B, V), present_key_i / present_value_i (B, H, P+1, Dh)
    caption_step.onnx      token (B,), pos () int64, past_key_i / past_value_i (B, H, L, Dh)
                           -> logits (B, V), present_key_i / present_value_i (B, H, L+1, Dh)
    image_encoder.onnx     images (B, S, S) in [-1, 1] -> mu, logvar (B, z_dim), embedding (B, E)
    caption_encoder.onnx   tokens (B, T) int64 -> mu, logvar (B, z_dim), embedding (B, E)

plus tokenizer.json (the checkpoint's), inkseed_onnx.json (sizes, graph files, the checkpoint's
digest, the parity result), inkseed_onnx.npz (the prior's alphas_cumprod and latent stats, the
tokenizer's punctuation mask) and onnx_sampler.py (a copy of model/onnx_sampler.py, the numpy
sampler that runs them).

The exporter is torch's TorchScript-based one (`torch.onnx.export(..., dynamo=False)`): with
torch 2.13 the dynamo-based default needs the extra `onnxscript` package and took ~10 s per graph
on a 2-core machine, against ~1 s here.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model import onnx_sampler
from model.checkpoint import Inkseed
from model.decoding import NO_REPEAT_NGRAM
from model.networks import JointModel
from model.sampling import generate
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID

FORMAT_VERSION = 1
EXAMPLE_BATCH = 2  # the traced batch; every graph's batch axis is dynamic


# -- the graphs: thin modules around the networks, with tensors in and out -----------------------
class _Denoiser(nn.Module):
    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.prior = model.prior

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.prior(x, t)


class _ImageDecoder(nn.Module):
    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode_image(z)


class _CaptionStart(nn.Module):
    """CaptionDecoder.start: the prefix + bos prefill, its KV cache flattened k0, v0, k1, v1, ...

    The prefill runs one position at a time through the cached path (each attends to itself and
    the earlier ones: the causal mask, unrolled), because the tracer turns `start`'s `n > 1` test of
    its causal switch into a tensor that scaled_dot_product_attention refuses."""

    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.dec = model.caption_decoder

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dec = self.dec
        bos = dec.embed(torch.zeros_like(z[:, :1], dtype=torch.long) + BOS_ID)  # (B, 1, W)
        x = torch.cat([dec._prefix(z), bos], dim=1) + dec.pos[: dec.p + 1]  # (B, P+1, W)
        cache: list = [None] * len(dec.blocks)
        for j in range(dec.p + 1):
            h = x[:, j : j + 1]  # (B, 1, W)
            for i, block in enumerate(dec.blocks):
                h, cache[i] = block(h, cache=cache[i])
        return (dec.lm_head(dec.norm(h[:, -1])), *[t for kv in cache for t in kv])


class _CaptionStep(nn.Module):
    """CaptionDecoder.step with the position as a tensor (a Python int would be traced as a constant)."""

    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.dec = model.caption_decoder

    def forward(self, token: torch.Tensor, pos: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dec = self.dec
        x = dec.embed(token)[:, None] + dec.pos.index_select(0, (pos + dec.p).reshape(1))  # (B, 1, W)
        present = []
        for i, block in enumerate(dec.blocks):
            x, kv = block(x, cache=(past[2 * i], past[2 * i + 1]))
            present.extend(kv)
        return (dec.lm_head(dec.norm(x[:, -1])), *present)


class _ImageEncoder(nn.Module):
    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.encode_image(images)


class _CaptionEncoder(nn.Module):
    def __init__(self, model: JointModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.encode_caption(tokens)


@dataclass
class _Graph:
    """One graph to trace: the module, example inputs, the names, and the dynamic axes besides
    axis 0 (the batch, dynamic for every input and output)."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]] = field(default_factory=dict)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {n: {0: "batch", **self.axes.get(n, {})} for n in self.inputs + self.outputs if n != "pos"}


def _caption_graphs(model: JointModel, z: torch.Tensor, g: torch.Generator) -> dict[str, _Graph]:
    layers = len(model.caption_decoder.blocks)
    present = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]  # k0, v0, k1, ...
    past = [name.replace("present_", "past_") for name in present]
    start = _CaptionStart(model)
    logits, *kv = start(z)
    step_axes = {**{n: {2: "past"} for n in past}, **{n: {2: "past_plus_one"} for n in present}}
    tokens = torch.randint(4, model.vocab_size, (EXAMPLE_BATCH, model.config.max_caption_tokens), generator=g)
    tokens[:, 0], tokens[:, -3], tokens[:, -2:] = BOS_ID, EOS_ID, PAD_ID
    embedded = ["mu", "logvar", "embedding"]
    return {
        "caption_start": _Graph(start, (z,), ["z"], ["logits", *present]),
        "caption_step": _Graph(
            _CaptionStep(model), (logits.argmax(-1), torch.tensor(1), *kv), ["token", "pos", *past],
            ["logits", *present], step_axes,
        ),  # fmt: skip
        "caption_encoder": _Graph(
            _CaptionEncoder(model), (tokens,), ["tokens"], embedded, {"tokens": {1: "tokens"}}
        ),
    }


def _graphs(model: JointModel) -> dict[str, _Graph]:
    """Every graph with example inputs of batch EXAMPLE_BATCH."""
    cfg, b = model.config, EXAMPLE_BATCH
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, cfg.z_dim, generator=g)
    x = torch.randn(b, cfg.z_dim, generator=g)
    images = torch.rand(b, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return {
        "prior_denoiser": _Graph(_Denoiser(model), (x, torch.tensor([10, 500])), ["x", "t"], ["eps"]),
        "image_decoder": _Graph(_ImageDecoder(model), (z,), ["z"], ["image"]),
        "image_encoder": _Graph(_ImageEncoder(model), (images,), ["images"], ["mu", "logvar", "embedding"]),
        **_caption_graphs(model, z, g),
    }


def _export_graph(graph: _Graph, path: Path, opset: int) -> None:
    import onnx

    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice, and tracer notes on shapes it keeps symbolic.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph.module, graph.args, str(path), input_names=graph.inputs, output_names=graph.outputs,
            dynamic_axes=graph.dynamic_axes(), opset_version=opset, dynamo=False,
        )  # fmt: skip
    onnx.checker.check_model(str(path))


def export_onnx(ink: Inkseed, out: str | Path, opset: int = 17) -> dict[str, Any]:
    """Write the export folder (module docstring) for a loaded checkpoint; returns its meta."""
    model = ink.model.cpu().eval()
    if model.config.z_dim < 16:  # onnx_sampler.torch_randn reproduces torch from 16 numbers on
        raise ValueError(f"the ONNX sampler needs >= 16 noise numbers a seed; this model draws z_dim={model.config.z_dim}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        graphs = _graphs(model)
        for name, graph in graphs.items():
            _export_graph(graph, out / f"{name}.onnx", opset)
    cfg = model.config
    meta = {
        "format_version": FORMAT_VERSION, "checkpoint": ink.path, "checkpoint_digest": ink.digest,
        "torch_version": torch.__version__, "opset": opset, "graphs": {n: f"{n}.onnx" for n in graphs},
        "z_dim": cfg.z_dim, "image_size": cfg.image_size, "max_caption_tokens": cfg.max_caption_tokens, "ddim_steps": cfg.ddim_steps, "vocab_size": model.vocab_size,
        "no_repeat_ngram": NO_REPEAT_NGRAM, "model_config": cfg.to_dict(),
    }  # fmt: skip
    np.savez(
        out / onnx_sampler.ARRAYS,
        alphas_cumprod=model.prior.alphas_cumprod.numpy(), latent_mean=model.prior.latent_mean.numpy(),
        latent_std=model.prior.latent_std.numpy(), punctuation=ink.tokenizer.punctuation_mask().numpy(),
    )  # fmt: skip
    (out / onnx_sampler.TOKENIZER).write_text(ink.tokenizer.to_json())
    (out / onnx_sampler.META).write_text(json.dumps(meta, indent=2))
    shutil.copyfile(onnx_sampler.__file__, out / "onnx_sampler.py")
    return meta


# -- parity --------------------------------------------------------------------------------------
@dataclass
class Parity:
    """The ONNX sampler against `generate()` on seeds 0..seeds-1 (fp32 on the CPU)."""

    seeds: int
    max_pixel_diff: int  # of 255
    pixels_differing: float  # share of all pixels
    captions_equal: int
    alignment_max_diff: float
    z_max_diff: float
    tolerance: int  # the largest max_pixel_diff accepted

    @property
    def ok(self) -> bool:
        return self.max_pixel_diff <= self.tolerance and self.captions_equal == self.seeds

    def record(self) -> dict[str, Any]:
        """The fields and `ok`, as inkseed_onnx.json keeps them."""
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        return (
            f"ONNX parity on {self.seeds} seeds: max pixel diff {self.max_pixel_diff}/255 "
            f"({self.pixels_differing:.4%} of pixels differ; tolerance {self.tolerance}/255), "
            f"captions equal {self.captions_equal}/{self.seeds}, "
            f"alignment max diff {self.alignment_max_diff:.2e}, z max diff {self.z_max_diff:.2e}: "
            + ("OK" if self.ok else "FAILED")
        )


def check_parity(ink: Inkseed, out: str | Path, seeds: int = 64, tolerance: int = 2) -> Parity:
    """Run seeds 0..seeds-1 through `generate()` and through the export's OnnxSampler; record the
    result in the folder's inkseed_onnx.json."""
    ref = generate(ink.model, ink.tokenizer, range(seeds), device="cpu", autocast=False)
    got = onnx_sampler.OnnxSampler(out, threads=torch.get_num_threads()).generate(list(range(seeds)))
    diff = np.abs(ref.images.astype(np.int16) - got.images.astype(np.int16))
    parity = Parity(
        seeds=seeds, max_pixel_diff=int(diff.max()), pixels_differing=float((diff > 0).mean()),
        captions_equal=sum(a == b for a, b in zip(ref.captions, got.captions)),
        alignment_max_diff=float(np.abs(ref.alignment - got.alignment).max()),
        z_max_diff=float(np.abs(ref.z - got.z).max()), tolerance=tolerance,
    )  # fmt: skip
    meta_file = Path(out) / onnx_sampler.META
    meta = json.loads(meta_file.read_text())
    meta["parity"] = parity.record()
    meta_file.write_text(json.dumps(meta, indent=2))
    return parity
