"""What a training checkpoint holds and how it is written, reported and restored (pickle-free).

Checkpoint directory, one per `ray.train.report`:
    model/                  save_checkpoint(...) output: weights, config, tokenizer (exportable)
    optimizer.safetensors   AdamW state through model.checkpoint.save_state (the one optimizer serialiser)
    train_state.json        TrainState and the LR scheduler state
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import ray.train
import torch

from model.checkpoint import (
    load_checkpoint,
    load_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
    save_state,
)
from model.networks import JointModel
from model.tokenizer import CaptionTokenizer
from pipeline.training.config import TrainConfig

MODEL_DIR, OPTIMIZER, TRAIN_STATE = "model", "optimizer.safetensors", "train_state.json"


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
    phase: Literal["autoencoder", "done"] = "autoencoder"

    def end_epoch(self, epoch: int, val_loss: float, patience: int) -> None:
        self.epoch, self.val_loss = epoch, val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped_early = patience > 0 and self.bad_epochs >= patience

    def epochs_left(self, epochs: int) -> range:
        return range(self.epoch + 1, (self.epoch if self.stopped_early else epochs) + 1)


@dataclass
class CheckpointParts:
    """What a training checkpoint is written from (the objects are updated in place)."""

    model: JointModel
    tokenizer: CaptionTokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    cfg: TrainConfig

    def write(self, path: str) -> None:
        """The checkpoint directory described in the module docstring."""
        state, cfg = self.state, self.cfg
        extra = {"run": cfg.name, "epoch": state.epoch, "val_loss": state.val_loss,
                 "phase": state.phase, "train_config": cfg.to_dict()}
        save_checkpoint(os.path.join(path, MODEL_DIR), self.model, self.tokenizer, extra=extra)
        save_state(os.path.join(path, OPTIMIZER), *optimizer_state_to_tensors(self.optimizer.state_dict()))
        meta = {"state": dataclasses.asdict(state), "scheduler": self.scheduler.state_dict()}
        with open(os.path.join(path, TRAIN_STATE), "w") as f:
            json.dump(meta, f, indent=2)


def report(metrics: dict[str, Any], rank: int, parts: CheckpointParts | None, dir_name: str | None = None) -> None:
    """ray.train.report on every rank (it is a barrier); with `parts`, rank 0 attaches a
    checkpoint named `dir_name` (default epoch-NNNN) and the other ranks attach none."""
    if parts is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            parts.write(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        name = dir_name or f"epoch-{parts.state.epoch:04d}"
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def restore_checkpoint(checkpoint: ray.train.Checkpoint, model: JointModel) -> tuple[TrainState, dict[str, Any]]:
    """Load the weights into `model`; returns the TrainState and {"optimizer", "scheduler"}: the
    state dicts to load once the optimizer exists (after DDP has placed the model on its device)."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_checkpoint(os.path.join(d, MODEL_DIR)).model.state_dict())
        with open(os.path.join(d, TRAIN_STATE)) as f:
            meta = json.load(f)
        tensors, opt_meta = load_state(os.path.join(d, OPTIMIZER))
    if "param_groups" in opt_meta:
        optimizer = optimizer_state_from_tensors(tensors, opt_meta)
    else:  # a run checkpointed before the one serialiser: "<param>.<name>" keys, groups in train_state.json
        optimizer = legacy_optimizer_state(tensors, meta["optimizer"])
    return TrainState(**meta["state"]), {"optimizer": optimizer, "scheduler": meta["scheduler"]}


def legacy_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.load_state_dict` input from the layout training checkpoints had until issue 11."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def read_phase(checkpoint: ray.train.Checkpoint) -> str:
    """"autoencoder" while phase 1 runs, "done" once the prior is fitted (read from train_state.json)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAIN_STATE}") as f:
        return json.loads(f.read())["state"]["phase"]
