"""The probes' cache (attribute and contrastive): trained once per dataset and settings, kept as
safetensors + JSON.

Default folder `<data>/.probe/` (pyarrow and the imagefolder reader skip dot-folders). The key
covers the dataset URI, a fingerprint of the dataset's files, the probe's settings (image size
included) and what it reads, so a changed dataset or setting trains a new probe.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipeline import storage
from pipeline.data.grammar import ATTRIBUTES
from pipeline.evaluation.freeform import FORMAT_VERSION as CONTRASTIVE_FORMAT
from pipeline.evaluation.freeform import ContrastiveProbe, ContrastiveProbeConfig, train_contrastive_probe
from pipeline.evaluation.probe import (
    FORMAT_VERSION,
    AttributeProbe,
    Log,
    Probe,
    ProbeConfig,
    fmt_accuracy,
    train_probe,
)
from pipeline.evaluation.real import RealSet, load_real


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
    train: RealSet | None = None,
    log: Log = print,
) -> Probe:
    """The dataset's probe: from the cache, or trained on the train split (then cached).

    `val` and `train` (the splits at cfg.image_size) may be passed when the caller has them already.
    """
    cache_dir = cache_dir or default_cache_dir(data_uri)
    key = probe_key(data_uri, cfg)
    probe = load_probe(cache_dir, cfg, key)
    if probe is not None:
        log(f"probe: cached {probe.source} (held-out accuracy {fmt_accuracy(probe.accuracy)})")
        return probe
    log(f"probe: none cached for this dataset at {cfg.image_size}px; training one on the train split")
    val = val if val is not None else load_real(data_uri, cfg.image_size, "val")
    train = train if train is not None else load_real(data_uri, cfg.image_size, "train")
    probe = train_probe(train, val, cfg, key=key, log=log)
    try:
        probe.source = save_probe(probe, cache_dir)
    except (storage.StorageError, OSError) as e:  # a read-only dataset still gets evaluated
        log(f"probe: could not cache it in {cache_dir} ({e}); pass --probe-cache to keep it")
    return probe


def contrastive_key(uri: str, cfg: ContrastiveProbeConfig) -> str:
    """Cache key of the contrastive probe: dataset URI, fingerprint and every probe setting."""
    canonical = uri if storage.is_s3(uri) else storage.filesystem(uri)[1]
    blob = json.dumps(
        {"format": CONTRASTIVE_FORMAT, "uri": canonical.rstrip("/"), "fingerprint": dataset_fingerprint(uri),
         "config": asdict(cfg)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def get_contrastive_probe(
    data_uri: str, cfg: ContrastiveProbeConfig, *, cache_dir: str | None = None, train: RealSet | None = None,
    log: Log = print,
) -> tuple[ContrastiveProbe, dict[str, Any]]:  # fmt: skip
    """The dataset's contrastive probe and what is known of it: from the cache, or trained on
    the train split (its images and captions; `train` when the caller has it) and then cached."""
    cache_dir = cache_dir or default_cache_dir(data_uri)
    key = contrastive_key(data_uri, cfg)
    stem = storage.join(cache_dir, f"contrastive-{cfg.image_size}px-{key}")
    names = {"probe.safetensors": f"{stem}.safetensors", "probe.json": f"{stem}.json"}
    if all(storage.exists(uri) for uri in names.values()):
        try:
            probe = ContrastiveProbe.from_files({name: storage.read_bytes(uri) for name, uri in names.items()})
            log(f"contrastive probe: cached {stem}.safetensors")
            return probe, {**probe.info, "key": key, "cached": True, "path": names["probe.safetensors"]}
        except (ValueError, KeyError, RuntimeError) as e:  # damaged: train again
            log(f"contrastive probe: cached copy unreadable ({e}); training again")
    log(f"contrastive probe: none cached for this dataset at {cfg.image_size}px; training one on the train split")
    train = train if train is not None else load_real(data_uri, cfg.image_size, "train")
    probe = train_contrastive_probe(train.images, train.captions, cfg, log=log)
    try:
        for name, data in probe.to_files().items():
            storage.write_bytes(names[name], data)
    except (storage.StorageError, OSError) as e:  # a read-only dataset still gets evaluated
        log(f"contrastive probe: could not cache it in {cache_dir} ({e}); pass --probe-cache to keep it")
    return probe, {**probe.info, "key": key, "cached": False, "path": names["probe.safetensors"]}
