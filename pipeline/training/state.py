"""What a training checkpoint holds and how it is written, reported, verified and read (pickle-free).

Checkpoint directory, one per `ray.train.report`:
    model/                        save_checkpoint(...) output: weights, config, tokenizer (exportable)
    optimizer.safetensors         AdamW state through model.checkpoint.save_state (the one optimizer serialiser)
    prior_optimizer.safetensors   phase 2 only: the prior's AdamW state
    discriminator.safetensors     from phase 3 on: the sharpening phase's PatchGAN (never exported)
    sharpen_optimizer.safetensors from phase 3 on: the decoder's and the discriminator's Adam states
    train_state.json              TrainState, the LR scheduler state (and the prior's in phase 2)
    sha256.json                   written last: the sha256 of train_state.json, the optimizer files
                                  and model/config.json (whose own hashes cover the weights and
                                  the tokenizer), so one file vouches for the whole checkpoint

`read_checkpoint` verifies every file (hashes, then parsing) before anything is loaded and raises
CheckpointError naming the file: a checkpoint cut short by a crash or a full disk, or damaged
later, is never half-restored. Checkpoints written before sha256.json existed (their TrainState
has no `setup`) are checked by parsing alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow.fs as pafs
import ray.train
import torch

from model.checkpoint import (
    CONFIG,
    CheckpointError,
    load_checkpoint,
    load_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
    save_state,
    sha256_file,
)
from model.config import ModelConfig
from model.io import atomic_write
from model.networks import JointModel
from model.tokenizer import CaptionTokenizer
from pipeline import storage
from pipeline.training.config import TrainConfig, run_dir

MODEL_DIR, OPTIMIZER, TRAIN_STATE = "model", "optimizer.safetensors", "train_state.json"
PRIOR_OPTIMIZER, MANIFEST = "prior_optimizer.safetensors", "sha256.json"
DISCRIMINATOR, SHARPEN_OPTIMIZER = "discriminator.safetensors", "sharpen_optimizer.safetensors"
Phase = Literal["autoencoder", "prior", "sharpen", "done"]
PHASES: tuple[Phase, ...] = ("autoencoder", "prior", "sharpen", "done")  # the order a run goes through


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides the weights (JSON in train_state.json)."""

    epoch: int = 0  # last completed epoch (1-based; 0 = none)
    global_step: int = 0
    best_val_loss: float | None = None
    best_epoch: int = 0
    val_loss: float | None = None  # of the weights now in the model
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    stopped_early: bool = False
    phase: Phase = "autoencoder"
    prior_epoch: int = 0  # phase-2 epochs completed
    prior_step: int = 0  # phase-2 optimizer steps done
    sharpen_step: int = 0  # phase-3 optimizer steps done
    # The run's start, kept on resume: data digest, batch_size, num_workers (a resume with others
    # is refused unless allowed), steps_per_epoch and total_steps (the LR schedule's length).
    setup: dict[str, Any] = field(default_factory=dict)

    def end_epoch(self, epoch: int, val_loss: float, patience: int) -> None:
        self.epoch, self.val_loss = epoch, val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped_early = patience > 0 and self.bad_epochs >= patience

    def finished(self, cfg: TrainConfig) -> bool:
        """Every phase of `cfg` is done (a finished run given more sharpen steps is not)."""
        return self.phase == "done" and self.sharpen_step >= cfg.sharpen.steps

    def epochs_left(self, epochs: int) -> range:
        if self.phase != "autoencoder":
            return range(0)
        return range(self.epoch + 1, (self.epoch if self.stopped_early else epochs) + 1)


@dataclass
class SharpenParts:
    """Phase 3's training-only state: the discriminator and both Adam optimizers."""

    discriminator: torch.nn.Module
    decoder_optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer

    def write(self, path: str) -> list[str]:
        """The phase's two files in checkpoint folder `path`; returns their names."""
        save_state(os.path.join(path, DISCRIMINATOR), self.discriminator.state_dict())
        tensors, meta = {}, {}
        for name, opt in (("decoder", self.decoder_optimizer), ("disc", self.disc_optimizer)):
            t, m = optimizer_state_to_tensors(opt.state_dict())
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
            meta[name] = m
        save_state(os.path.join(path, SHARPEN_OPTIMIZER), tensors, meta)
        return [DISCRIMINATOR, SHARPEN_OPTIMIZER]


@dataclass
class CheckpointParts:
    """What a training checkpoint is written from (the objects are updated in place; the prior's
    optimizer and scheduler join once phase 2 starts)."""

    model: JointModel
    tokenizer: CaptionTokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    cfg: TrainConfig
    prior_optimizer: torch.optim.Optimizer | None = None
    prior_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    sharpen: SharpenParts | None = None
    # jobs.train's command line and config file text (recorded in config.json's extra)
    made_by: dict[str, str] = field(default_factory=dict)

    def write(self, path: str) -> None:
        """The checkpoint directory described in the module docstring (sha256.json last)."""
        state, cfg = self.state, self.cfg
        extra = {"run": cfg.name, "epoch": state.epoch, "val_loss": state.val_loss, "phase": state.phase,
                 "sharpen_step": state.sharpen_step, "train_config": cfg.to_dict(), **self.made_by}
        save_checkpoint(os.path.join(path, MODEL_DIR), self.model, self.tokenizer, extra=extra)
        save_state(os.path.join(path, OPTIMIZER), *optimizer_state_to_tensors(self.optimizer.state_dict()))
        meta: dict[str, Any] = {"state": dataclasses.asdict(state), "scheduler": self.scheduler.state_dict()}
        if self.prior_optimizer is not None and self.prior_scheduler is not None:
            tensors = optimizer_state_to_tensors(self.prior_optimizer.state_dict())
            save_state(os.path.join(path, PRIOR_OPTIMIZER), *tensors)
            meta["prior_scheduler"] = self.prior_scheduler.state_dict()
        atomic_write(os.path.join(path, TRAIN_STATE), json.dumps(meta, indent=2).encode())
        covered = [OPTIMIZER, TRAIN_STATE, f"{MODEL_DIR}/{CONFIG}"] + [PRIOR_OPTIMIZER] * ("prior_scheduler" in meta)
        if self.sharpen is not None:  # phase 3 and after it (a finished run may sharpen on)
            covered += self.sharpen.write(path)
        hashes = {name: sha256_file(os.path.join(path, name)) for name in covered}
        atomic_write(os.path.join(path, MANIFEST), json.dumps({"sha256": hashes}, indent=2).encode())


def report(metrics: dict[str, Any], rank: int, parts: CheckpointParts | None, dir_name: str | None = None) -> None:
    """ray.train.report on every rank (it is a barrier); with `parts`, rank 0 attaches a
    checkpoint named `dir_name` (default epoch-NNNN; Ray Train uses rank 0's name) and the other
    ranks attach none."""
    if parts is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, name = None, dir_name or f"epoch-{parts.state.epoch:04d}"
        if rank == 0:
            parts.write(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            name = free_name(run_dir(parts.cfg), name)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def free_name(run: str, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when Ray Train already has a checkpoint of that name: a
    run that fell back past a corrupt checkpoint redoes its epoch, and writing into the corrupt
    one's folder would let Ray delete the new checkpoint when it retires the old. A folder Ray does
    not know (an upload cut short before it was registered) is written over."""
    if not storage.exists(storage.join(run, name)):
        return name
    taken = {posixpath.basename(r.checkpoint.path.rstrip("/")) for r in ray.train.get_all_reported_checkpoints()}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


@dataclass
class Restored:
    """A verified training checkpoint, read into memory (the optimizer and scheduler states are
    loaded once those exist, after DDP has placed the model on its device)."""

    checkpoint: ray.train.Checkpoint
    state: TrainState
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    prior_optimizer: dict[str, Any] | None = None
    prior_scheduler: dict[str, Any] | None = None
    # Phase 3: {"discriminator": state dict, "decoder": optimizer state, "disc": optimizer state}
    sharpen: dict[str, Any] | None = None


def uri_of(checkpoint: ray.train.Checkpoint) -> str:
    """The checkpoint's location as the user wrote it: a local path, or s3://bucket/key."""
    local = isinstance(checkpoint.filesystem, pafs.LocalFileSystem)
    return checkpoint.path if local else f"s3://{checkpoint.path.lstrip('/')}"


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> Restored:
    """Verify and read a training checkpoint (module docstring); CheckpointError names the file."""
    uri = uri_of(checkpoint)
    with checkpoint.as_directory() as d:
        try:
            return _read_dir(d, checkpoint)
        except CheckpointError as e:  # a downloaded copy (S3): name the file where it is stored
            raise CheckpointError(e.file.replace(d, uri, 1), e.problem) from e


def _read_dir(d: str, checkpoint: ray.train.Checkpoint) -> Restored:
    meta = _json(os.path.join(d, TRAIN_STATE))
    try:
        state = TrainState(**meta["state"])
        scheduler = meta["scheduler"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(os.path.join(d, TRAIN_STATE), f"not a training state ({e})") from e
    if state.setup or os.path.exists(os.path.join(d, MANIFEST)):  # today's layout: every file hashed
        _check_manifest(d)
    ink = load_checkpoint(os.path.join(d, MODEL_DIR))  # its own hashes, shapes and finite weights
    restored = Restored(checkpoint, state, ink.config, ink.model.state_dict(), _optimizer(d, OPTIMIZER, meta), scheduler)
    if "prior_scheduler" in meta:
        restored.prior_optimizer = _optimizer(d, PRIOR_OPTIMIZER, {})
        restored.prior_scheduler = meta["prior_scheduler"]
    if os.path.exists(os.path.join(d, DISCRIMINATOR)):
        restored.sharpen = _sharpen_state(d)
    return restored


def _sharpen_state(d: str) -> dict[str, Any]:
    """Phase 3's discriminator weights and both optimizer states (SharpenParts.write)."""
    disc, _ = load_state(os.path.join(d, DISCRIMINATOR))
    tensors, meta = load_state(os.path.join(d, SHARPEN_OPTIMIZER))
    out: dict[str, Any] = {"discriminator": disc}
    for name in ("decoder", "disc"):
        if name not in meta:
            raise CheckpointError(os.path.join(d, SHARPEN_OPTIMIZER), f"holds no {name} optimizer state")
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        out[name] = optimizer_state_from_tensors(own, meta[name])
    return out


def _json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError as e:
        raise CheckpointError(path, "missing from the checkpoint") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not readable as JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object")
    return data


def _check_manifest(d: str) -> None:
    """Every file sha256.json lists has its hash (a missing sha256.json: the checkpoint was cut short)."""
    hashes = _json(os.path.join(d, MANIFEST)).get("sha256")
    if not isinstance(hashes, dict) or TRAIN_STATE not in hashes:
        raise CheckpointError(os.path.join(d, MANIFEST), "lists no train_state.json hash")
    for name, expected in hashes.items():
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            raise CheckpointError(path, "missing from the checkpoint (sha256.json lists it)")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(path, f"sha256 mismatch: sha256.json expects {str(expected)[:16]}..., "
                                        f"the file has {actual[:16]}... (truncated or modified)")  # fmt: skip


def _optimizer(d: str, name: str, meta: dict[str, Any]) -> dict[str, Any]:
    tensors, opt_meta = load_state(os.path.join(d, name))
    if "param_groups" in opt_meta:
        return optimizer_state_from_tensors(tensors, opt_meta)
    if "optimizer" not in meta:
        raise CheckpointError(os.path.join(d, name), "holds no optimizer state")
    # A run checkpointed before the one serialiser: "<param>.<name>" keys, groups in train_state.json.
    return legacy_optimizer_state(tensors, meta["optimizer"])


def legacy_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.load_state_dict` input from the layout training checkpoints had until issue 11."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def read_phase(checkpoint: ray.train.Checkpoint) -> str:
    """"autoencoder" in phase 1, "prior" in phase 2, "sharpen" in phase 3, "done" at the end."""
    path = f"{checkpoint.path}/{TRAIN_STATE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return json.loads(f.read())["state"]["phase"]
    except Exception as e:  # noqa: BLE001  (missing, unreadable, not JSON, no phase: all mean "not usable")
        raise CheckpointError(f"{uri_of(checkpoint)}/{TRAIN_STATE}", f"unreadable ({storage.describe(e)})") from e
