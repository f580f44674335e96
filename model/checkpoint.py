"""Self-describing, pickle-free checkpoints.

A checkpoint is one directory:

    model.safetensors   the JointModel weights (tied weights stored once)
    config.json         {"format_version", "model_config", "vocab_size", "weights_sha256",
                         "tokenizer_sha256", "config_sha256", "extra"}
    tokenizer.json      the `tokenizers` JSON string

`load_checkpoint(path)` alone rebuilds model + tokenizer; it reads only JSON and safetensors
(never pickle) and raises `CheckpointError` naming the file and the problem when a file is
missing, truncated, corrupt, edited after saving (sha256 mismatch), asks for sizes beyond
`model.limits.CONFIG_LIMITS`, or does not fit the config.

What the hashes cover. `weights_sha256` and `tokenizer_sha256` are the sha256 of those files'
bytes; `config_sha256` is the sha256 of config.json's own content without that field (canonical
JSON: sorted keys, no whitespace), so it covers the model config, vocab_size, extra and the two
file hashes: one stored value vouches for all three files. An edit that keeps every shape (say
`ddim_steps`), or a tokenizer of the same size with its ids shuffled, is refused on load.
Format 1 (`LEGACY_FORMAT`, e.g. checkpoints/default before its default-v4 retrain) recorded `weights_sha256`
only: it still loads, with the weights checked and the config and tokenizer taken as they are.
`save_checkpoint` always writes format 2.
Options removed by issue 25, stored "off" by older checkpoints, are dropped once the hashes have
been checked on config.json as saved; one that was on is refused (`limits.without_removed_options`).

The digest (`checkpoint_digest`: sha256 over the three files' names, sizes and bytes, in a fixed
order) identifies a checkpoint for provenance (run.json, manifests); it covers the config and
the tokenizer as well as the weights, in both formats, and is unchanged by format 2.

`save_state` / `load_state` store any dict of tensors plus JSON metadata the same way (e.g. the
optimizer, see `optimizer_state_to_tensors`), so training resumes without pickle either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from model import sampling
from model.config import ModelConfig
from model.io import atomic_write
from model.limits import check_limits, without_removed_options
from model.networks import JointModel
from model.tokenizer import CaptionTokenizer

FORMAT_VERSION = 2
LEGACY_FORMAT = 1  # weights_sha256 only (module docstring)
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
FILES = (CONFIG, WEIGHTS, TOKENIZER)  # digest order


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, tampered with or does not fit its config."""

    def __init__(self, file: str | os.PathLike, problem: str) -> None:
        self.file, self.problem = str(file), problem
        super().__init__(f"{file}: {problem}")

    def __reduce__(self):  # picklable, so it reaches a Ray driver as itself from a worker
        return CheckpointError, (self.file, self.problem)


# -- hashing / atomic writes ----------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(meta: dict[str, Any]) -> str:
    """sha256 of config.json's content without its `config_sha256` field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_digest(path: str | os.PathLike) -> str:
    """sha256 over (name, size, bytes) of config.json, model.safetensors, tokenizer.json."""
    h = hashlib.sha256()
    for name in FILES:
        p = Path(path) / name
        h.update(f"{name}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors kept once (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().to("cpu").contiguous()
    return out


# -- save / load ----------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: JointModel,
    tokenizer: CaptionTokenizer,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write the checkpoint directory (each file atomically); returns its digest."""
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, model was built for {model.vocab_size}"
        )
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_bytes = tokenizer.to_json().encode()
    meta = {
        "format_version": FORMAT_VERSION,
        "model_class": "JointModel",
        "model_config": model.config.to_dict(),
        "vocab_size": model.vocab_size,
        "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
        "extra": extra or {},
    }
    try:  # checked before any file is written; hashed as it will read back (int keys become str)
        meta = json.loads(json.dumps(meta))
    except TypeError as e:
        raise TypeError(f"checkpoint `extra` must be JSON-serializable: {e}") from e
    atomic_write(root / WEIGHTS, save_tensors(_unique_state(model), metadata={"format": "pt"}))
    meta["weights_sha256"] = sha256_file(root / WEIGHTS)
    meta["config_sha256"] = config_sha256(meta)  # last: it covers every other field
    atomic_write(root / CONFIG, json.dumps(meta, indent=2, sort_keys=True).encode())
    atomic_write(root / TOKENIZER, tokenizer_bytes)
    return checkpoint_digest(root)


@dataclass
class Inkseed:
    """A loaded checkpoint: the model (eval mode), its tokenizer, config, digest and extra info.

    `sampling` holds default keyword arguments for every call below (set by `with_sampling`:
    DDIM `steps` for the calls that sample the prior, bf16 `autocast` for all); a call's own
    arguments win."""

    model: JointModel
    tokenizer: CaptionTokenizer
    config: ModelConfig
    digest: str
    extra: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def with_sampling(self, steps: int | None = None, autocast: bool | None = None) -> Inkseed:
        """The same checkpoint whose calls default to `steps` DDIM steps and bf16 `autocast`
        (None: the config's steps; bf16 on CUDA, off on CPU)."""
        return dataclasses.replace(self, sampling={"steps": steps, "autocast": autocast})

    def _kw(self, kw: dict[str, Any], steps_arg: str | None = None) -> dict[str, Any]:
        """kw over the defaults; the DDIM steps go in as `steps_arg` (calls without a prior: none)."""
        defaults = {"autocast": self.sampling.get("autocast")}
        if steps_arg:
            defaults[steps_arg] = self.sampling.get("steps")
        return {**defaults, **kw}

    def generate(self, seeds: Sequence[int], **kw: Any) -> sampling.Samples:
        return sampling.generate(self.model, self.tokenizer, seeds, **self._kw(kw, "steps"))

    def caption(self, images: np.ndarray | torch.Tensor, **kw: Any) -> list[str]:
        return sampling.caption(self.model, self.tokenizer, images, **self._kw(kw))

    def illustrate(self, captions: Sequence[str], seeds: Sequence[int], **kw: Any) -> np.ndarray:
        return sampling.illustrate(self.model, self.tokenizer, captions, seeds, **self._kw(kw))

    def interpolate(self, seed_a: int, seed_b: int, steps: int = 8, **kw: Any) -> sampling.Samples:
        return sampling.interpolate(self.model, self.tokenizer, seed_a, seed_b, steps, **self._kw(kw, "ddim_steps"))

    def alignment(self, images: np.ndarray | torch.Tensor, captions: Sequence[str], **kw: Any) -> np.ndarray:
        return sampling.alignment(self.model, self.tokenizer, images, captions, **self._kw(kw))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(file, f"not readable as JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(file, "expected a JSON object")
    return data


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> Inkseed:
    """Rebuild model + tokenizer from a checkpoint directory; never unpickles."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(root, "checkpoint directory does not exist")
    if not root.is_dir():
        raise CheckpointError(
            root, "is not a checkpoint directory (expected a directory with " + ", ".join(FILES) + ")"
        )
    for name in FILES:
        if not (root / name).is_file():
            raise CheckpointError(root / name, "missing from the checkpoint directory")
    meta, config = _read_config(root / CONFIG)  # 1. format, config hash, limits, model config
    tokenizer = _read_tokenizer(root / TOKENIZER, meta)  # 2. parse, hash, token count
    state = _read_weights(root / WEIGHTS, meta["weights_sha256"])  # 3. parse, hash, finite
    _check_state(root / WEIGHTS, _expected_shapes(config, meta["vocab_size"]), state, config)  # 4. no memory yet
    model = JointModel(config, meta["vocab_size"])
    model.load_state_dict(state, strict=False)  # tied weights arrive through their one stored copy
    model.to(device).eval()
    return Inkseed(
        model, tokenizer, config, checkpoint_digest(root), dict(meta.get("extra") or {}), str(root)
    )


def _read_config(file: Path) -> tuple[dict[str, Any], ModelConfig]:
    meta = _read_json(file)
    version = meta.get("format_version")
    if version not in (FORMAT_VERSION, LEGACY_FORMAT):
        raise CheckpointError(
            file, f"unsupported format_version {version!r} (this code reads {LEGACY_FORMAT} and {FORMAT_VERSION})"
        )
    hashes = ("weights_sha256",) if version == LEGACY_FORMAT else ("weights_sha256", "tokenizer_sha256", "config_sha256")
    for key in ("model_config", "vocab_size", *hashes):
        if key not in meta:
            raise CheckpointError(file, f"missing field {key!r}")
    if version == FORMAT_VERSION and config_sha256(meta) != meta["config_sha256"]:
        raise CheckpointError(
            file, "sha256 mismatch: its content differs from what was saved (config_sha256); "
            "the config was edited after saving: restore it, or re-export the checkpoint",
        )  # fmt: skip
    try:
        check_limits(meta["model_config"], meta["vocab_size"])  # before ModelConfig or a network
        stored = without_removed_options(meta["model_config"])  # after the hashes: as saved
    except ValueError as e:
        raise CheckpointError(file, str(e)) from e
    try:
        return meta, ModelConfig.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise CheckpointError(file, f"invalid model_config ({e})") from e


def _expected_shapes(config: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every stored weight's shape for this config, from a network built on the meta device (no
    memory): a config that does not fit the file is refused before a real network is allocated."""
    with torch.device("meta"):
        model = JointModel(config, vocab_size)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    tied |= {n for n, _ in model.named_buffers(remove_duplicate=False)} - {n for n, _ in model.named_buffers()}
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in tied}


def _read_tokenizer(file: Path, meta: dict[str, Any]) -> CaptionTokenizer:
    try:
        data = file.read_bytes()
        tokenizer = CaptionTokenizer.from_json(data.decode())
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(file, f"not a valid tokenizer ({e})") from e
    expected = meta.get("tokenizer_sha256")
    if meta["format_version"] == FORMAT_VERSION and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            file, f"sha256 mismatch: config.json expects {str(expected)[:16]}... "
            "(the tokenizer was modified or replaced: its token ids would not match the weights)",
        )  # fmt: skip
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise CheckpointError(
            file, f"has {tokenizer.vocab_size} tokens but config.json says vocab_size={meta['vocab_size']}"
        )
    return tokenizer


def _read_weights(file: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Parse (truncation / corruption), then the hash (tampering), then finiteness: NaN or inf
    weights would write black images with empty captions and NaN alignment into a manifest."""
    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(file, f"truncated or corrupt safetensors file ({e})") from e
    actual = sha256_file(file)
    if actual != expected_sha256:
        raise CheckpointError(
            file,
            f"sha256 mismatch: config.json expects {str(expected_sha256)[:16]}..., file has {actual[:16]}... "
            "(the weights were modified or replaced)",
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(file, f"{len(bad)} weight(s) hold NaN or inf values, e.g. {bad[:3]}")
    return state


def _check_state(
    file: Path, expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], config: ModelConfig
) -> None:
    where = f"(config.json: image_size={config.image_size}, z_dim={config.z_dim}, channels={list(config.channels)})"
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs config {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if bad:
        raise CheckpointError(file, f"shape mismatch with {where} in {len(bad)} weight(s): " + "; ".join(bad[:3]))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(file, f"missing {len(missing)} weight(s) the config needs {where}, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(file, f"{len(unexpected)} unexpected weight(s) {where}, e.g. {unexpected[:5]}")


def read_checkpoint_files(read: Callable[[str], bytes], where: str) -> dict[str, bytes]:
    """The checkpoint's files through any reader (`read(name) -> bytes`: a local folder, S3, ...),
    for `load_checkpoint_files` or to ship to Ray actors. CheckpointError names a missing file."""
    files = {}
    for name in FILES:
        try:
            files[name] = read(name)
        except (OSError, RuntimeError) as e:  # FileNotFoundError, pipeline.storage.StorageError
            raise CheckpointError(f"{where.rstrip('/')}/{name}", f"missing or unreadable ({e})") from e
    return files


def load_checkpoint_files(files: dict[str, bytes], device: torch.device | str = "cpu") -> Inkseed:
    """load_checkpoint from the files' bytes (read from S3, or shipped to a Ray actor): they are
    written to a temporary folder and loaded (and verified) from there."""
    with tempfile.TemporaryDirectory(prefix="inkseed-ckpt-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_checkpoint(tmp, device=device)


# -- generic tensor state (optimizer, scheduler, RNG) without pickle ------------------------------
def save_state(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> None:
    """One safetensors file: tensors plus JSON metadata (atomic write)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(p, save_tensors(clean, metadata={"meta": json.dumps(meta or {}, sort_keys=True)}))


def load_state(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of save_state; CheckpointError on a missing or corrupt file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "state file does not exist")
    try:
        tensors = load_file(str(p), device=str(device))
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
        meta = json.loads(md.get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(p, f"truncated or corrupt state file ({e})") from e
    return tensors, meta


def optimizer_state_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten `optimizer.state_dict()` into tensors ("state.<param>.<name>") and JSON meta."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of optimizer_state_to_tensors: a dict for `optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}
