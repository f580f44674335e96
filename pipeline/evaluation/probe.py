"""The attribute probe: a small CNN that reads every grammar attribute off a real engraving.

The evaluation job needs an independent reader of images. The probe is trained on real images
of the dataset's train split only (labels: the attribute fields of its metadata), measured on
held-out real images (val split), and never sees a generated image, so a generated image that
the probe reads as "a windmill at night" looks like the real windmills at night it was trained
on. Its penultimate features are also the feature space of the Fréchet distance (fidelity).

It is trained once per dataset and image size and cached as safetensors + JSON (default under
`<data>/.probe/`; pyarrow and the imagefolder reader skip dot-folders), keyed by the dataset
URI, the image size, a fingerprint of the dataset files and the probe's own settings.

Images enter as uint8 (B, S, S), ink dark on light paper: the same format `model.sampling`
returns, so real and generated images go through exactly the same conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from pipeline import storage
from pipeline.data.grammar import ATTRIBUTES

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
    batch_size: int = 64
    lr: float = 3e-3
    # Cap on training images: 8K are plenty for ~6 attributes and keep CPU training short.
    max_train: int = 8_000
    # Share of training images blurred by a Gaussian of sigma uniform in blur_sigma (pixels at
    # 64 px, scaled with the image size). Without it the probe keys on the crispness of the
    # hatching and misreads a slightly soft but otherwise right image (at 64 px, sigma 0.8 took
    # its all-attribute accuracy from 1.00 to 0.09); sharpness is the Fréchet distance's job.
    blur_share: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    seed: int = 0


@dataclass
class RealSet:
    """Real images of one split, decoded at one size: uint8 (N, S, S) plus their metadata."""

    images: np.ndarray
    captions: list[str]
    file_names: list[str]
    # Grammar attributes per row (values as str); None for a row without all of them.
    attributes: list[dict[str, str] | None]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, idx: Sequence[int] | np.ndarray) -> RealSet:
        idx = [int(i) for i in idx]
        return RealSet(
            self.images[idx],
            [self.captions[i] for i in idx],
            [self.file_names[i] for i in idx],
            [self.attributes[i] for i in idx],
        )

    def labeled(self) -> RealSet:
        """The rows that carry every grammar attribute."""
        return self.subset([i for i, a in enumerate(self.attributes) if a is not None])


def grammar_attributes(raw: dict, spec: dict[str, tuple[str, ...]] = ATTRIBUTES) -> dict[str, str] | None:
    """The grammar attributes of one metadata row (values as str), None if any is missing or unknown."""
    out = {}
    for name, values in spec.items():
        value = raw.get(name)
        if value is None or str(value) not in values:
            return None
        out[name] = str(value)
    return out


def load_real(uri: str, image_size: int, split: Literal["train", "val"]) -> RealSet:
    """Every row of one split of a dataset (any format `pipeline.data` reads), sorted by file name
    so the same dataset always gives the same order."""
    from pipeline.data.ingest import read_dataset  # Ray Data; imported here so the probe itself needs no Ray

    # No caption truncation: a cut caption would no longer parse in the grammar.
    ds = read_dataset(uri, image_size=image_size, split=split, max_caption_tokens=1024)
    images, captions, names, attrs = [], [], [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        x = np.asarray(batch["image"], dtype=np.float32)  # (B, S, S) in [-1, 1]
        images.append(np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8))
        captions += [str(c) for c in batch["caption"]]
        names += [str(n) for n in batch["file_name"]]
        attrs += [grammar_attributes(json.loads(a or "{}")) for a in batch["attributes"]]
    order = np.argsort(np.asarray(names), kind="stable")
    stacked = np.concatenate(images)
    return RealSet(stacked, captions, names, attrs).subset(order)


# -- the network ----------------------------------------------------------------------------------
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
        x = images.float()[:, None] / 127.5 - 1.0  # (B, 1, S, S) in [-1, 1]
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


# -- training -------------------------------------------------------------------------------------
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
    b, scale = x.shape[0], cfg.image_size / 64
    lo, hi = cfg.blur_sigma
    sigma = (lo + (hi - lo) * torch.rand(b, generator=gen)) * scale  # (B,)
    keep = torch.rand(b, generator=gen) >= cfg.blur_share  # (B,)
    r = max(1, math.ceil(2.5 * hi * scale))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1): separable kernel per image
    h = F.pad(x[None], (r, r, r, r), mode="replicate")  # (1, B, S+2r, S+2r)
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
    log(f"probe: held-out accuracy {_fmt_acc(probe.accuracy)} after {seconds:.0f}s on {len(train)} images")
    return probe


def _fmt_acc(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())


# -- cache ----------------------------------------------------------------------------------------
def dataset_fingerprint(uri: str) -> str:
    """sha256 of the dataset's metadata file(s) and of its top-level file names and sizes.

    Rendering more images, editing captions or replacing Parquet parts changes it; reading
    every image would cost as much as training the probe, so image bytes are not hashed.
    """
    fs, path = storage.filesystem(uri)
    h = hashlib.sha256()
    info = fs.get_file_info(path)
    if info.type == storage.pafs.FileType.NotFound:
        raise FileNotFoundError(f"dataset {uri!r} does not exist")
    infos = (
        [info]
        if info.type == storage.pafs.FileType.File
        else fs.get_file_info(storage.pafs.FileSelector(path))
    )
    for i in sorted(infos, key=lambda i: i.path):
        if i.type != storage.pafs.FileType.File:
            continue
        name = i.path.rsplit("/", 1)[-1]
        h.update(f"{name}\t{i.size}\n".encode())
        if name in ("metadata.jsonl", "metadata.csv"):
            with fs.open_input_stream(i.path) as f:
                h.update(f.read())
    return h.hexdigest()


def probe_key(uri: str, cfg: ProbeConfig, attributes: dict[str, tuple[str, ...]] = ATTRIBUTES) -> str:
    """Cache key: dataset URI, fingerprint, the probe settings (incl. image size) and the attribute set."""
    canonical = uri if storage.is_s3(uri) else storage.filesystem(uri)[1]
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "uri": canonical.rstrip("/"),
            "fingerprint": dataset_fingerprint(uri),
            "config": asdict(cfg),
            "attributes": {k: list(v) for k, v in attributes.items()},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir(data_uri: str) -> str:
    """`<data>/.probe` for a dataset folder, `<folder of the file>/.probe` for a single file."""
    if storage.is_dir(data_uri):
        return storage.join(data_uri, ".probe")
    if storage.is_s3(data_uri):
        return storage.join(data_uri.rstrip("/").rsplit("/", 1)[0], ".probe")
    return storage.join(os.path.dirname(os.path.abspath(data_uri)), ".probe")


def _paths(cache_dir: str, cfg: ProbeConfig, key: str) -> tuple[str, str]:
    stem = storage.join(cache_dir, f"probe-{cfg.image_size}px-{key}")
    return f"{stem}.safetensors", f"{stem}.json"


def save_probe(probe: Probe, cache_dir: str) -> str:
    """Write weights (safetensors) and description (JSON); returns the weights path."""
    weights, meta = _paths(cache_dir, probe.config, probe.key)
    state = {k: v.detach().cpu().contiguous() for k, v in probe.net.state_dict().items()}
    storage.write_bytes(weights, save_tensors(state))
    doc = {
        "format_version": FORMAT_VERSION,
        "key": probe.key,
        "config": asdict(probe.config),
        "attributes": {k: list(v) for k, v in probe.attributes.items()},
        "accuracy": probe.accuracy,
        "train_seconds": probe.train_seconds,
        "train_size": probe.train_size,
        "val_size": probe.val_size,
        "epochs": probe.epochs,
        "weights_sha256": hashlib.sha256(storage.read_bytes(weights)).hexdigest(),
    }
    storage.write_bytes(meta, json.dumps(doc, indent=1).encode())
    return weights


def load_probe(cache_dir: str, cfg: ProbeConfig, key: str) -> Probe | None:
    """The cached probe for this key, or None when there is none (or it is damaged: retrain)."""
    weights, meta = _paths(cache_dir, cfg, key)
    if not (storage.exists(weights) and storage.exists(meta)):
        return None
    try:
        doc = json.loads(storage.read_bytes(meta))
        blob = storage.read_bytes(weights)
        if doc.get("key") != key or hashlib.sha256(blob).hexdigest() != doc.get("weights_sha256"):
            return None
        attributes = {k: tuple(v) for k, v in doc["attributes"].items()}
        net = AttributeProbe(cfg, attributes)
        net.load_state_dict(load_tensors(blob))
    except (ValueError, KeyError, RuntimeError, json.JSONDecodeError):
        return None
    return Probe(
        net.eval(),
        cfg,
        key,
        doc["accuracy"],
        doc["train_seconds"],
        doc["train_size"],
        doc["val_size"],
        doc["epochs"],
        cached=True,
        source=weights,
    )


def get_probe(
    data_uri: str,
    cfg: ProbeConfig,
    *,
    cache_dir: str | None = None,
    val: RealSet | None = None,
    log: Log = print,
) -> Probe:
    """The dataset's probe: from the cache, or trained on the train split (then cached).

    `val` (the held-out split at cfg.image_size) may be passed when the caller has it already.
    """
    cache_dir = cache_dir or default_cache_dir(data_uri)
    key = probe_key(data_uri, cfg)
    probe = load_probe(cache_dir, cfg, key)
    if probe is not None:
        log(f"probe: cached {probe.source} (held-out accuracy {_fmt_acc(probe.accuracy)})")
        return probe
    log(f"probe: none cached for this dataset at {cfg.image_size}px; training one on the train split")
    val = val if val is not None else load_real(data_uri, cfg.image_size, "val")
    train = load_real(data_uri, cfg.image_size, "train")
    probe = train_probe(train, val, cfg, key=key, log=log)
    try:
        probe.source = save_probe(probe, cache_dir)
    except (storage.StorageError, OSError) as e:  # a read-only dataset still gets evaluated
        log(f"probe: could not cache it in {cache_dir} ({e}); pass --probe-cache to keep it")
    return probe


__all__ = [
    "AttributeProbe",
    "Probe",
    "ProbeConfig",
    "RealSet",
    "accuracy",
    "dataset_fingerprint",
    "get_probe",
    "grammar_attributes",
    "load_probe",
    "load_real",
    "probe_key",
    "save_probe",
    "train_probe",
]
