"""Train the joint model on Ray Train (DDP): the joint phase, the latent prior, then decoder
sharpening (`sharpen.steps`); export the checkpoint.

On a Ray cluster (from the repo root; the dashboard address of the head node):

    ray job submit --working-dir . -- python -m jobs.train --config configs/default.yaml \\
        --num-workers 2 --storage-path s3://my-bucket/inkseed-runs --name base-v1

Locally (starts an in-process Ray), and the 1-minute smoke test (tiny model, 128 samples,
1 epoch; on 200 engravings it renders to a temp folder, unless --data is given):

    python -m jobs.train --config configs/default.yaml
    python -m jobs.train --smoke-test

Running the same command again (same --storage-path and --name) resumes the run from its
latest checkpoint. The exported checkpoint path (`<storage-path>/<name>/export`) is printed
last; `python -m jobs.generate --checkpoint <that path>` reads it. Metrics: W&B (offline
without WANDB_API_KEY) and `<storage-path>/<name>/metrics.jsonl`.

A failure ends with one line, `error: ...`, naming the file or URI and what to do (`--debug`
shows the traceback instead).
"""

from __future__ import annotations

import functools
import os
import shlex
import tempfile
from dataclasses import dataclass
from typing import Annotated

import tyro

from jobs.cli import argv_or_sys, flag_value, parse, run_job
from jobs.ray_owner import run_owning_ray
from pipeline import storage
from pipeline.training.config import TrainConfig, load_train_config
from pipeline.training.driver import run_training

# Where --smoke-test renders a small dataset when --data does not exist.
SMOKE_DATA = os.path.join(tempfile.gettempdir(), "inkseed-smoke-data")

@dataclass
class TrainArgs:
    """The job's flags: every TrainConfig field, plus --config and --smoke-test."""

    train: Annotated[TrainConfig, tyro.conf.arg(name="")]
    # YAML file of TrainConfig fields, or a name in configs/ (`--config tiny`); flags override it.
    config: str | None = None
    # A one-minute run of the whole job: tiny preset at 32 px, 128 samples, 1 epoch (on a small
    # rendered dataset unless --data is given); the run name gets -smoke.
    smoke_test: bool = False
    # On failure, show the full traceback instead of the one-line error.
    debug: bool = False


def _config_path(value: str) -> str:
    """A YAML path, or the name of a file in configs/ (`--config tiny`)."""
    if value.endswith((".yaml", ".yml")) or os.path.sep in value:
        return value
    return os.path.join("configs", f"{value}.yaml")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    argv = argv_or_sys(argv)
    config = flag_value(argv, "--config")
    base = load_train_config(_config_path(config)) if config else TrainConfig()
    smoke = "--smoke-test" in argv
    if smoke:  # on its own small rendered dataset unless --data is given
        base = smoke_test_config(base if flag_value(argv, "--data") else base.replace(data=SMOKE_DATA))
    cfg = parse(TrainArgs, argv, TrainArgs(base, config, smoke), __doc__.split("\n")[0]).train
    if smoke and not cfg.name.endswith("-smoke"):  # a --name given with --smoke-test: keep runs apart
        cfg = cfg.replace(name=f"{cfg.name}-smoke")
    return cfg


def smoke_test_config(cfg: TrainConfig) -> TrainConfig:
    """A one-minute run of the whole job: tiny model at 32 px, 128 samples, 1 epoch."""
    return cfg.replace(
        preset="tiny", image_size=32, epochs=1, batch_size=16, max_train_samples=128, max_val_samples=32,
        prior_epochs=5, log_every=4, log_samples=2, name=f"{cfg.name}-smoke",
    )


def provenance(argv: list[str] | None = None) -> dict[str, str]:
    """What made a run, for its checkpoints' config.json: the command line and the text of its
    --config file, so that nothing else is needed to make the checkpoint again."""
    argv = argv_or_sys(argv)
    record = {"command": shlex.join(["python", "-m", "jobs.train", *argv])}
    config = flag_value(argv, "--config")
    if config and os.path.isfile(_config_path(config)):
        with open(_config_path(config)) as f:
            record.update(config_file=_config_path(config), config_yaml=f.read())
    return record


def main(cfg: TrainConfig, argv: list[str] | None = None) -> str:
    """Run the job. Ray starts once the inputs are checked (inside `ray job submit` RAY_ADDRESS
    points at the cluster; otherwise a local Ray starts) and is shut down if it started here."""
    if cfg.data == SMOKE_DATA and not storage.exists(os.path.join(SMOKE_DATA, "metadata.jsonl")):
        from pipeline.data.engrave import render_dataset

        render_dataset(SMOKE_DATA, count=200, size=64, seed=0)  # read at 32 px
    return run_owning_ray(functools.partial(run_training, made_by=provenance(argv)), cfg)


if __name__ == "__main__":
    config = run_job(parse_args)
    run_job(lambda: main(config))
