"""Evaluation job: measure a checkpoint against a dataset (pipeline/evaluation/).

Locally (Ray starts in-process only to read the dataset; the model runs in this process):

    python -m jobs.evaluate --checkpoint CKPT --data data/engravings --num-seeds 1000 --out eval/

On a Ray cluster (the job's driver does the work; checkpoint, data and output may be s3://):

    ray job submit --working-dir . -- python -m jobs.evaluate --checkpoint s3://bucket/ckpt --data s3://bucket/engravings --num-seeds 1000 --out s3://bucket/eval

It writes OUT/report.json, OUT/contact_sheet.png and OUT/contact_sheet.html, and prints a short
table. The first run on a dataset trains its probes on the train split (the contrastive probe
always, the attribute probe where the metadata has the grammar's attributes) and caches them in
<data>/.probe/ (or --probe-cache); later runs reuse them. Every EvaluateConfig field is a flag,
the probes' settings as --probe.NAME and --contrastive.NAME.
"""

from __future__ import annotations

import sys
from typing import Any

from jobs.cli import argv_or_sys, parse
from jobs.ray_owner import run_owning_ray
from model.checkpoint import CheckpointError
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.run import run_evaluation
from pipeline.storage import StorageError


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    """Every EvaluateConfig field is a flag; the probe's settings are --probe.NAME."""
    return parse(EvaluateConfig, argv_or_sys(argv), EvaluateConfig(), __doc__.split("\n")[0])


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; shut Ray down afterwards if this process started it."""
    return run_owning_ray(run_evaluation, cfg)


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except (ValueError, CheckpointError, StorageError) as e:  # bad input: EvaluateError, DatasetError, ...
        sys.exit(f"error: {e}")
