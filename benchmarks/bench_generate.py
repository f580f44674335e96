"""Benchmark of the mass generation job (pipeline/generation/run.py). Not a test: it prints numbers.

1. Throughput: seeds/s of the full Ray Data pipeline (run_generation: actors, PNG writes,
   manifests, validation) against a plain in-process loop over the same checkpoint and batch
   size that does the same per-seed work (generate, encode PNG, sha256, write the file), and
   the ratio pipeline / loop. The pipeline time includes starting its actors.
   "Steady state" excludes the actors' start: rows after the first batch over the span of the
   manifest's created_at stamps.
2. Driver memory: peak RSS (ru_maxrss) of a fresh driver process generating 10K and 100K seeds
   (default shard size 10K), which must be about equal because the driver streams.

    python benchmarks/bench_generate.py                      # tiny preset, 2 DDIM steps
    python benchmarks/bench_generate.py --model micro --rss-sizes 10000 100000

The checkpoint is an untrained one of the chosen size (speed does not depend on training;
untrained caption decoders never stop early, so captions cost their full token budget).
"micro" is the tiny preset at 16 px with 8-token captions, for the 100K memory runs on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig, get_preset
from model.images import png_bytes
from model.networks import JointModel
from model.tokenizer import CaptionTokenizer

CAPTIONS = [
    "an engraving of a windmill on the hills under a crescent moon at night",
    "a print of a sailing ship at sea in the middle by day",
]


def model_config(name: Literal["tiny", "micro"]) -> ModelConfig:
    tiny = get_preset("tiny")
    if name == "tiny":
        return tiny
    return tiny.replace(image_size=16, channels=[32, 16, 8], max_caption_tokens=8)


def make_checkpoint(path: Path, name: Literal["tiny", "micro"]) -> None:
    torch.manual_seed(0)
    tok = CaptionTokenizer.train(CAPTIONS)
    save_checkpoint(path, JointModel(model_config(name), tok.vocab_size), tok)


def plain_loop(checkpoint: str, seeds: range, batch_size: int, steps: int, out: Path) -> float:
    """Seeds/s of generate + PNG encode + sha256 + file write in one process, no Ray."""
    ink = load_checkpoint(checkpoint)
    ink.generate(list(seeds[:batch_size]), steps=steps)  # warm-up, like an actor's first batch
    start = time.perf_counter()
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i : i + batch_size])
        samples = ink.generate(chunk, steps=steps)
        for seed, image in zip(chunk, samples.images):
            data = png_bytes(image)
            hashlib.sha256(data).hexdigest()
            (out / f"{seed}.png").write_bytes(data)
    return len(seeds) / (time.perf_counter() - start)


def pipeline_run(checkpoint: str, num_seeds: int, args: argparse.Namespace, out: str, actors: int) -> dict:
    import ray

    from pipeline.generation.config import GenerateConfig
    from pipeline.generation.run import run_generation

    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=4,  # logical: room for 2 actors at 0.5 CPU plus Ray Data's read tasks
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}},
        )
    try:
        cfg = GenerateConfig(
            checkpoint=checkpoint,
            output=out,
            num_seeds=num_seeds,
            batch_size=args.batch_size,
            steps=args.steps,
            min_actors=actors,
            max_actors=actors,
            shard_size=args.shard_size,
            torch_threads=args.threads,  # the same threads as the loop (the job's default: node CPUs / actors)
        )
        return run_generation(cfg)
    finally:
        if started:
            ray.shutdown()


def steady_rate(out: str, batch_size: int) -> float:
    """Seeds/s once the actors are up: rows after the first batch over the span of the rows'
    created_at stamps (taken when each batch leaves the model)."""
    stamps = pq.read_table(Path(out, "manifest"), columns=["created_at"])["created_at"]
    first, last = pc.min(stamps).value, pc.max(stamps).value  # microseconds
    return (len(stamps) - batch_size) / ((last - first) / 1e6)


def rss_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one pipeline run, then its own peak RSS as JSON on the last line."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        summary = pipeline_run(args.checkpoint, args.rss_child, args, tmp, actors=args.actors[-1])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"num_seeds": args.rss_child, "peak_rss_mib": round(peak_mib, 1), **summary}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "micro"), default="tiny")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint instead of a fresh untrained one")
    p.add_argument("--seeds", type=int, default=2000, help="seeds for the throughput comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="DDIM steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads, in the loop and per actor")
    p.add_argument("--actors", type=int, nargs="+", default=[1], help="actor counts to measure")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[], help="e.g. 10000 100000")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        return rss_child(args)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        checkpoint = args.checkpoint or str(Path(tmp, "ckpt"))
        if args.checkpoint is None:
            make_checkpoint(Path(checkpoint), args.model)
        print(
            f"model {args.model}, {args.steps} DDIM steps, batch {args.batch_size}, {args.threads} torch thread(s)"
        )
        if args.seeds:
            loop_dir = Path(tmp, "loop")
            loop_dir.mkdir()
            loop = plain_loop(checkpoint, range(args.seeds), args.batch_size, args.steps, loop_dir)
            print(f"plain loop: {loop:.1f} seeds/s over {args.seeds} seeds")
            for actors in args.actors:
                out = str(Path(tmp, f"pipe{actors}"))
                s = pipeline_run(checkpoint, args.seeds, args, out, actors)
                steady = steady_rate(out, args.batch_size)
                print(
                    f"pipeline, {actors} actor(s): {s['seeds_per_s']:.1f} seeds/s over {s['seconds']:.1f} s incl. "
                    f"actor start (ratio {s['seeds_per_s'] / loop:.2f}); steady state {steady:.1f} seeds/s "
                    f"(ratio {steady / loop:.2f})"
                )
        for n in args.rss_sizes:
            cmd = [sys.executable, __file__, "--rss-child", str(n), "--checkpoint", checkpoint]
            cmd += [
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            cmd += ["--shard-size", str(args.shard_size), "--actors", str(args.actors[-1])]
            result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"driver peak RSS, {n} seeds: {r['peak_rss_mib']:.0f} MiB "
                f"({r['seconds']:.0f} s, {r['seeds_per_s']:.0f} seeds/s, {r['manifest_rows']} rows)"
            )


if __name__ == "__main__":
    main()
