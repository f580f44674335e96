"""Mass generation job: seeds -> engravings + captions + Parquet manifests (pipeline/generation/).

On a Ray cluster (one actor per GPU by default; the output can be any S3-compatible store):

    ray job submit --working-dir . -- python -m jobs.generate --checkpoint CKPT --num-seeds 100000 --output s3://bucket/run1

Locally (starts a local Ray):

    python -m jobs.generate --num-seeds 1000 --output outputs/run1
    python -m jobs.generate --seeds-file seeds.txt --output outputs/picked
    python -m jobs.generate --smoke-test        # 64 seeds, 5 DDIM steps, into outputs/smoke-test

    python -m jobs.generate --num-seeds 100000 --output s3://bucket/run2 --format webdataset  # a tar per shard
    python -m jobs.generate --num-seeds 100000 --output s3://bucket/run3 --format parquet     # PNGs in the parts

Re-running the same command after an interruption finishes the missing seeds. Each run ends by
writing OUT/contact_sheet.png and OUT/stats.json (pipeline/generation/stats.py). The output layout
of each --format and the manifest columns are described in pipeline/generation/manifest.py.
Checking an output:

    python -m jobs.generate --num-seeds 1000 --output outputs/run1 --verify   # or: python -m jobs.verify outputs/run1
    python -m jobs.generate --num-seeds 1000 --output outputs/run1 --repair   # regenerate damaged shards

A failure ends with one line, `error: ...`, naming the file or URI and what to do (`--debug`
shows the traceback instead).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

import tyro

from jobs.cli import argv_or_sys, parse
from jobs.ray_owner import run_owning_ray
from pipeline.generation.config import GenerateConfig
from pipeline.generation.errors import one_line
from pipeline.generation.run import run_generation

# --smoke-test defaults: a one-minute CPU run that exercises every stage, always starting fresh.
SMOKE_TEST = {
    "num_seeds": 64,
    "shard_size": 32,
    "batch_size": 16,
    "steps": 5,
    "max_actors": 1,
    "output": "outputs/smoke-test",
    "overwrite": True,
}


@dataclass
class GenerateArgs:
    """The job's flags: every GenerateConfig field, plus --smoke-test."""

    generate: Annotated[GenerateConfig, tyro.conf.arg(name="")]
    # A tiny fresh run that exercises every stage (64 seeds, 5 DDIM steps, 1 actor, into
    # outputs/smoke-test); flags given with it still win.
    smoke_test: bool = False
    # On failure, show the full traceback instead of the one-line error.
    debug: bool = False


def parse_job(argv: list[str] | None = None) -> GenerateArgs:
    argv = argv_or_sys(argv)
    smoke = "--smoke-test" in argv
    default = GenerateArgs(GenerateConfig(**SMOKE_TEST) if smoke else GenerateConfig(), smoke)
    return parse(GenerateArgs, argv, default, __doc__.split("\n")[0])


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    return parse_job(argv).generate


def main(cfg: GenerateConfig) -> dict[str, Any]:
    """Run the job; Ray starts only once the inputs are checked (joins the cluster under
    `ray job submit` through RAY_ADDRESS, else starts a local one) and is shut down if we started it."""
    return run_owning_ray(run_generation, cfg)


if __name__ == "__main__":
    args = parse_job()
    try:
        main(args.generate)
    except BaseException as e:
        if args.debug or isinstance(e, SystemExit):
            raise
        sys.exit(f"error: {one_line(e)}")
