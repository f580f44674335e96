"""Mass generation job: seeds -> engravings + captions + Parquet manifests (pipeline/generate.py).

On a Ray cluster (one actor per GPU by default; the output can be any S3-compatible store):

    ray job submit --working-dir . -- python -m jobs.generate --checkpoint CKPT --num-seeds 100000 --output s3://bucket/run1

Locally (starts a local Ray):

    python -m jobs.generate --num-seeds 1000 --output outputs/run1
    python -m jobs.generate --seeds-file seeds.txt --output outputs/picked
    python -m jobs.generate --smoke-test        # 64 seeds, 5 DDIM steps, into outputs/smoke-test

Re-running the same command after an interruption finishes the missing seeds. The output layout
and the manifest columns are described in pipeline/manifest.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.ray_owner import run_owning_ray
from pipeline.generation.config import GenerateConfig, GenerateError
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


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    d = GenerateConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=d.checkpoint, help="checkpoint directory, local or s3://")
    p.add_argument("--output", default=d.output, help="output root, local or s3://")
    p.add_argument("--seed-start", type=int, default=d.seed_start, help="first seed of the range")
    p.add_argument("--num-seeds", type=int, default=None, help="number of seeds in the range")
    p.add_argument("--seeds-file", default=None, help="text file of seeds, one per line (instead of a range)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="seeds per model call")
    p.add_argument("--min-actors", type=int, default=d.min_actors)
    p.add_argument("--max-actors", type=int, default=None, help="default: one per GPU slot, 1 on CPU")
    p.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per actor (default 1 if the cluster has GPUs)"
    )
    p.add_argument(
        "--num-cpus", type=float, default=d.num_cpus, help="CPUs per actor (also its torch threads)"
    )
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="seeds per manifest part file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    p.add_argument("--io-threads", type=int, default=d.io_threads, help="PNG encode/write threads per actor")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output and start fresh")
    p.add_argument("--smoke-test", action="store_true", help="a tiny fresh run: " + str(SMOKE_TEST))
    if "--smoke-test" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_TEST)  # explicit flags still win
    args = vars(p.parse_args(argv))
    del args["smoke_test"]
    return GenerateConfig(**args)


def main(cfg: GenerateConfig) -> dict[str, Any]:
    """Run the job; Ray starts only once the inputs are checked (joins the cluster under
    `ray job submit` through RAY_ADDRESS, else starts a local one) and is shut down if we started it."""
    return run_owning_ray(run_generation, cfg)


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except GenerateError as e:
        sys.exit(f"error: {e}")
