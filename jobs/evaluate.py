"""Evaluation job: measure a checkpoint against a dataset (pipeline/evaluate.py).

Locally (Ray starts in-process only to read the dataset; the model runs in this process):

    python -m jobs.evaluate --checkpoint CKPT --data data/engravings --num-seeds 1000 --out eval/

On a Ray cluster (the job's driver does the work; checkpoint, data and output may be s3://):

    ray job submit --working-dir . -- python -m jobs.evaluate --checkpoint s3://bucket/ckpt --data s3://bucket/engravings --num-seeds 1000 --out s3://bucket/eval

It writes OUT/report.json, OUT/contact_sheet.png and OUT/contact_sheet.html, and prints a short
table. The first run on a dataset trains the attribute probe on the train split and caches it in
<data>/.probe/ (or --probe-cache); later runs reuse it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.ray_owner import run_owning_ray
from model.checkpoint import CheckpointError
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.probe import ProbeConfig
from pipeline.evaluation.run import run_evaluation
from pipeline.storage import StorageError


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    d = EvaluateConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=d.checkpoint, help="checkpoint directory, local or s3://")
    p.add_argument("--data", default=d.data, help="dataset (image folder or Parquet), local or s3://")
    p.add_argument("--num-seeds", type=int, default=d.num_seeds, help="N: seeds generated and measured")
    p.add_argument("--out", default=d.out, help="output folder, local or s3://")
    p.add_argument("--seed-start", type=int, default=d.seed_start, help="first seed of the range")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per model call")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--probe-cache", default=d.probe_cache, help="probe cache folder (default <data>/.probe)")
    p.add_argument("--probe-epochs", type=int, default=d.probe.epochs, help="probe training epochs")
    p.add_argument(
        "--num-conditional", type=int, default=d.num_conditional, help="held-out pairs per conditional mode"
    )
    p.add_argument("--determinism-seeds", type=int, default=d.determinism_seeds, help="seeds re-generated")
    args = vars(p.parse_args(argv))
    probe = ProbeConfig(epochs=args.pop("probe_epochs"))
    return EvaluateConfig(**args, probe=probe)


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; shut Ray down afterwards if this process started it."""
    return run_owning_ray(run_evaluation, cfg)


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except (ValueError, CheckpointError, StorageError) as e:  # bad input: EvaluateError, DatasetError, ...
        sys.exit(f"error: {e}")
