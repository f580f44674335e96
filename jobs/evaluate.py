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

A failure ends with one line, `error: ...`, naming the file or URI and what to do (`--debug`
shows the traceback instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import tyro

from jobs.cli import argv_or_sys, parse, run_job
from jobs.ray_owner import run_owning_ray
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.run import run_evaluation


@dataclass
class EvaluateArgs:
    """The job's flags: every EvaluateConfig field, plus --debug."""

    evaluate: Annotated[EvaluateConfig, tyro.conf.arg(name="")]
    # On failure, show the full traceback instead of the one-line error.
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    """Every EvaluateConfig field is a flag; the probe's settings are --probe.NAME."""
    return parse(EvaluateArgs, argv_or_sys(argv), EvaluateArgs(EvaluateConfig()), __doc__.split("\n")[0]).evaluate


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; shut Ray down afterwards if this process started it."""
    return run_owning_ray(run_evaluation, cfg)


if __name__ == "__main__":
    config = run_job(parse_args)
    run_job(lambda: main(config))
