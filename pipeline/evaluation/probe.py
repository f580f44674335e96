"""The attribute probe: a small CNN that reads every grammar attribute off a real engraving.

The evaluation job needs an independent reader of images. The probe is trained on real images
of the dataset's train split only (labels: the attribute fields of its metadata), measured on
held-out real images (val split), and never sees a generated image, so a generated image that
the probe reads as "a windmill at night" looks like the real windmills at night it was trained
on. Its penultimate features are also the feature space of the Fréchet distance (fidelity).

It is trained once per dataset and image size and cached (pipeline/evaluation/probe_cache.py).

Images enter as uint8 (B, S, S), ink dark on light paper: the same format `model.sampling`
returns, so real and generated images go through exactly the same conversion.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.images import to_float
from pipeline.data.grammar import ATTRIBUTES
from pipeline.evaluation.real import RealSet

FORMAT_VERSION = 1
Log = Callable[[str], None]


@dataclass
class ProbeConfig:
    """How the probe is built and trained. Every field is part of the cache key."""

    # Image side the probe reads; the evaluation sets it to the checkpoint's image size.
    image_size: int = 128
    # Conv widths: the stem (at 64 px), then one stride-2 stage each (64 -> 32 -> 16 -> 8 px).
    channels: tuple[int, ...] = (16, 32, 64, 96)
    # Width of the penultimate features: the Fréchet space. Kept well below the ~1,000
    # held-out images per set, so the covariance estimate is not rank-starved.
    feature_dim: int = 64
    # Two epochs of 8K images (250 steps) read 100% of 2,036 held-out engravings right, at 64
    # and at 128 px; more buys nothing.
    epochs: int = 2
    # ... but a small dataset gets more epochs, up to this many optimizer steps in all: the
    # probe needs a couple of hundred steps whatever the dataset size.
    min_steps: int = 200
    # Images per optimizer step (BatchNorm needs more than a handful).
    batch_size: int = 64
    # Peak learning rate of the one-cycle schedule (AdamW).
    lr: float = 3e-3
    # Cap on training images: 8K are plenty for ~6 attributes and keep CPU training short.
    max_train: int = 8_000
    # Share of training images blurred by a Gaussian of sigma uniform in blur_sigma (pixels at
    # 64 px, scaled with the image size). Without it the probe keys on the crispness of the
    # hatching and misreads a slightly soft but otherwise right image (at 64 px, sigma 0.8 took
    # its all-attribute accuracy from 1.00 to 0.09); sharpness is the Fréchet distance's job.
    blur_share: float = 0.5
    # The range of that sigma, in pixels at 64 px.
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    # Seeds the init, the data order and the blur draws: the same seed trains the same probe.
    seed: int = 0


class AttributeProbe(nn.Module):
    """uint8-range images -> penultimate features -> one logit vector per attribute.

    The stem brings a larger image down to 64 px with a strided conv whose kernel still covers every
    pixel (a 1-2 px hatch line is seen, not skipped), which keeps 128 px training as cheap as
    64 px. Stride-2 stages then go down to 8x8, and an adaptive 4x4 pool keeps the coarse layout
    (position left/center/right, sky above, ground below) that a global pool would lose.
    """

    def __init__(self, cfg: ProbeConfig, attributes: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.attributes = {k: tuple(v) for k, v in attributes.items()}
        s = max(1, cfg.image_size // 64)
        c_in = cfg.channels[0]
        layers: list[nn.Module] = [
            nn.Conv2d(1, c_in, 2 * s + 1, stride=s, padding=s),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
        ]
        for c in cfg.channels[1:]:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())  # (B, C * 16)
        self.embed = nn.Sequential(nn.Linear(c_in * 16, cfg.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict(
            {k: nn.Linear(cfg.feature_dim, len(v)) for k, v in self.attributes.items()}
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images uint8 or float 0..255 (B, S, S) -> features (B, F)."""
        x = to_float(images)[:, None]  # (B, 1, S, S) in [-1, 1]
        return self.embed(self.trunk(x))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)  # (B, F)
        return {k: head(h) for k, head in self.heads.items()}  # each (B, V_k)


@dataclass
class Probe:
    """A trained probe with what is known about it (held-out accuracy, training time, cache key)."""

    net: AttributeProbe
    config: ProbeConfig
    key: str
    # Held-out (val split) accuracy per attribute, plus "all" (every attribute right at once).
    accuracy: dict[str, float]
    train_seconds: float
    train_size: int
    val_size: int
    epochs: int  # run; more than config.epochs for a small dataset (config.min_steps)
    cached: bool = False
    source: str = ""  # where it was loaded from / saved to

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        return self.net.attributes

    @torch.inference_mode()
    def read(self, images: np.ndarray, batch_size: int = 256) -> tuple[list[dict[str, str]], np.ndarray]:
        """uint8 (N, S, S) -> (attributes read per image, features float64 (N, F))."""
        _check_images(images, self.config.image_size)
        self.net.eval()
        preds: dict[str, list[np.ndarray]] = {k: [] for k in self.attributes}
        feats = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            h = self.net.features(x)
            feats.append(h.double().numpy())
            for k, head in self.net.heads.items():
                preds[k].append(head(h).argmax(-1).numpy())
        idx = {k: np.concatenate(v) if v else np.zeros(0, int) for k, v in preds.items()}
        values = self.attributes
        rows = [{k: values[k][int(idx[k][i])] for k in values} for i in range(len(images))]
        return rows, (np.concatenate(feats) if feats else np.zeros((0, self.config.feature_dim)))

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "train_seconds": round(self.train_seconds, 1),
            "train_size": self.train_size,
            "val_size": self.val_size,
            "image_size": self.config.image_size,
            "epochs": self.epochs,
            "feature_dim": self.config.feature_dim,
            "cached": self.cached,
            "path": self.source,
        }


def _check_images(images: np.ndarray, size: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
        raise ValueError(f"probe expects uint8 images (N, {size}, {size}), got {images.dtype} {images.shape}")


def _labels(rows: RealSet, attributes: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """Class index per attribute, (N,) each; every row must be labeled."""
    return {
        k: torch.tensor([values.index(a[k]) for a in rows.attributes], dtype=torch.long)  # type: ignore[index]
        for k, values in attributes.items()
    }


def accuracy(pred: Sequence[dict[str, str]], truth: Sequence[dict[str, str]]) -> dict[str, float]:
    """Share of rows where pred matches truth, per attribute and for all attributes at once."""
    if len(pred) != len(truth) or not truth:
        raise ValueError(f"accuracy needs two equally long non-empty lists, got {len(pred)} and {len(truth)}")
    names = list(truth[0])
    out = {k: float(np.mean([p[k] == t[k] for p, t in zip(pred, truth)])) for k in names}
    out["all"] = float(np.mean([all(p[k] == t[k] for k in names) for p, t in zip(pred, truth)]))
    return out


def blur_some(x: torch.Tensor, cfg: ProbeConfig, gen: torch.Generator) -> torch.Tensor:
    """Gaussian-blur a random cfg.blur_share of the images x (B, S, S) float, each by its own sigma."""
    return random_blur(x, cfg.blur_share, cfg.blur_sigma, cfg.image_size / 64, gen, pad="replicate")


def random_blur(
    x: torch.Tensor, share: float, sigma_range: tuple[float, float], scale: float, gen: torch.Generator,
    pad: str = "replicate",
) -> torch.Tensor:  # fmt: skip
    """Blur a random `share` of the images x (B, S, S) by a Gaussian each, sigma uniform in
    sigma_range times scale (pixels at 64 px); both probes' augmentation. `pad`: how the border
    is extended ("constant" = zeros)."""
    b = x.shape[0]
    lo, hi = sigma_range
    sigma = (lo + (hi - lo) * torch.rand(b, generator=gen)) * scale  # (B,)
    keep = torch.rand(b, generator=gen) >= share  # (B,)
    r = max(1, math.ceil(2.5 * hi * scale))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1): separable kernel per image
    h = F.pad(x[None], (r, r, r, r), mode=pad)  # (1, B, S+2r, S+2r)
    h = F.conv2d(h, k[:, None, None, :], groups=b)  # rows
    h = F.conv2d(h, k[:, None, :, None], groups=b)[0]  # columns -> (B, S, S)
    return torch.where(keep[:, None, None], x, h)


def train_probe(
    train: RealSet,
    val: RealSet,
    cfg: ProbeConfig,
    attributes: dict[str, tuple[str, ...]] = ATTRIBUTES,
    key: str = "",
    log: Log = print,
) -> Probe:
    """Train on the labeled rows of `train` (at most cfg.max_train), measure on those of `val`."""
    train, val = train.labeled(), val.labeled()
    if len(train) < 2 * cfg.batch_size or not len(val):
        raise ValueError(
            f"the probe needs labeled real images: got {len(train)} train and {len(val)} val rows with every "
            f"attribute of {sorted(attributes)}"
        )
    _check_images(train.images, cfg.image_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if len(train) > cfg.max_train:
        train = train.subset(torch.randperm(len(train), generator=gen)[: cfg.max_train].sort().values.numpy())
    net = AttributeProbe(cfg, attributes)
    x_all = torch.from_numpy(train.images)  # (N, S, S) uint8: 4x smaller than float in memory
    y_all = _labels(train, attributes)
    steps_per_epoch = len(train) // cfg.batch_size  # drop the ragged last batch (BatchNorm)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            logits = net(blur_some(x_all[idx].float(), cfg, gen))
            loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in attributes)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            total += float(loss.detach())
        log(f"probe epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}")
    seconds = time.perf_counter() - start
    probe = Probe(net.eval(), cfg, key, {}, seconds, len(train), len(val), epochs)
    pred, _ = probe.read(val.images)
    probe.accuracy = accuracy(pred, val.attributes)  # type: ignore[arg-type]
    log(f"probe: held-out accuracy {fmt_accuracy(probe.accuracy)} after {seconds:.0f}s on {len(train)} images")
    return probe


def fmt_accuracy(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
