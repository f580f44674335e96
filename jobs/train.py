"""Train the joint model on Ray Train (DDP), then fit the latent prior; export the checkpoint.

On a Ray cluster (from the repo root; the dashboard address of the head node):

    ray job submit --working-dir . -- python -m jobs.train --config configs/base.yaml \\
        --num-workers 2 --storage-path s3://my-bucket/inkseed-runs --name base-v1

Locally (starts an in-process Ray), and the 1-minute smoke test (tiny model, 128 samples,
1 epoch; on 200 engravings it renders to a temp folder, unless --data is given):

    python -m jobs.train --config configs/base.yaml
    python -m jobs.train --smoke-test

Running the same command again (same --storage-path and --name) resumes the run from its
latest checkpoint. The exported checkpoint path (`<storage-path>/<name>/export`) is printed
last; `python -m jobs.generate --checkpoint <that path>` reads it. Metrics: W&B (offline
without WANDB_API_KEY) and `<storage-path>/<name>/metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from model.config import PRESETS
from pipeline import storage
from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.driver import run_training

# Where --smoke-test renders a small dataset when --data does not exist.
SMOKE_DATA = os.path.join(tempfile.gettempdir(), "inkseed-smoke-data")

# CLI flag -> TrainConfig field, for the settings people change from run to run.
_OVERRIDES: dict[str, type] = {
    "data": str,
    "preset": str,
    "image_size": int,
    "init_from": str,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "weight_decay": float,
    "patience": int,
    "prior_epochs": int,
    "num_workers": int,
    "cpus_per_worker": float,
    "torch_threads": int,
    "storage_path": str,
    "name": str,
    "seed": int,
    "max_train_samples": int,
    "max_val_samples": int,
    "checkpoint_every": int,
    "max_failures": int,
    "precision": str,
    "wandb_project": str,
    "wandb_mode": str,
}


def _config_path(value: str) -> str:
    """A YAML path, or the name of a file in configs/ (`--config tiny`)."""
    if value.endswith((".yaml", ".yml")) or os.path.sep in value:
        return value
    return os.path.join("configs", f"{value}.yaml")


def _loss_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--loss-weight expects NAME=VALUE, got {text!r}")
    return name, float(value)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of TrainConfig fields, or a name in configs/ (tiny, base)")
    choices = {"preset": sorted(PRESETS), "precision": ["auto", "bf16", "fp32"],
               "wandb_mode": ["auto", "online", "offline", "disabled"]}
    for name, kind in _OVERRIDES.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, choices=choices.get(name),
                       help=f"TrainConfig.{name} (pipeline/train.py documents each field)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker")
    p.add_argument("--loss-weight", action="append", type=_loss_weight, default=[], metavar="NAME=VALUE",
                   help="override one loss weight (repeatable), e.g. --loss-weight kl=0.002")
    p.add_argument("--smoke-test", action="store_true", help="tiny preset, few samples, 1 epoch")
    args = p.parse_args(argv)

    cfg = load_train_config(_config_path(args.config)) if args.config else TrainConfig()
    changes: dict[str, Any] = {k: getattr(args, k) for k in [*_OVERRIDES, "use_gpu"] if getattr(args, k) is not None}
    if args.loss_weight:
        changes["loss_weights"] = {**cfg.loss_weights, **dict(args.loss_weight)}
    cfg = cfg.replace(**changes)
    if args.smoke_test:  # on its own small rendered dataset unless --data is given
        cfg = smoke_test_config(cfg if args.data else cfg.replace(data=SMOKE_DATA))
    return cfg


def smoke_test_config(cfg: TrainConfig) -> TrainConfig:
    """A one-minute run of the whole job: tiny model at 32 px, 128 samples, 1 epoch."""
    return cfg.replace(
        preset="tiny", image_size=32, epochs=1, batch_size=16, max_train_samples=128, max_val_samples=32,
        prior_epochs=5, log_every=4, log_samples=2, name=f"{cfg.name}-smoke",
    )


def main(cfg: TrainConfig) -> str:
    import ray

    if cfg.data == SMOKE_DATA and not storage.exists(os.path.join(SMOKE_DATA, "metadata.jsonl")):
        from pipeline.data.engrave import render_dataset

        render_dataset(SMOKE_DATA, count=200, size=64, seed=0)  # read at 32 px
    # Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local Ray starts.
    ray.init()
    try:
        return run_training(cfg)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(parse_args())
