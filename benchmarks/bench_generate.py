"""Benchmark of the mass generation job (pipeline/generation/run.py). Not a test: it prints numbers.

1. Throughput: seeds/s of the full Ray Data pipeline (run_generation: actors, PNG writes,
   manifests, validation) against a plain in-process loop over the same checkpoint and batch
   size that does the same per-seed work (generate, encode PNG, sha256, write the file), and
   the ratio pipeline / loop. The pipeline time includes starting its actors.
   "Steady state" excludes the actors' start: rows after the first batch over the span of the
   manifest's created_at stamps.
2. The model loop against the hardware: this machine's matmul peak (fp32 and bf16, measured
   here), the loop's per-stage ms per batch (prior DDIM, image decoder, caption decoding,
   alignment scoring), FLOPs per sample (bench_model.count_macs) and the achieved GFLOP/s as a
   share of the peak of the precision used.
3. Driver memory: peak RSS (ru_maxrss) of a fresh driver process generating each of --rss-sizes
   seeds (default shard size 10K), which must be about equal because the driver streams. These
   runs use the untrained "micro" model (the tiny preset at 16 px, 8-token captions): memory does
   not depend on the model; 1M seeds of it take about 23 minutes on 2 cores (PNG writes dominate).

    python benchmarks/bench_generate.py                                   # checkpoints/default, fp32
    python benchmarks/bench_generate.py --bf16 --seeds 4000
    python benchmarks/bench_generate.py --seeds 0 --rss-sizes 100000 1000000
    python benchmarks/bench_generate.py --model tiny --steps 2            # an untrained tiny model

The loop and each actor use --threads torch threads (default: every CPU of the machine, as
jobs.generate's one CPU actor does).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import count_macs  # noqa: E402

from model import sampling  # noqa: E402
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.config import ModelConfig, get_preset  # noqa: E402
from model.decoding import decode_tokens  # noqa: E402
from model.images import png_bytes, to_uint8  # noqa: E402
from model.networks import JointModel  # noqa: E402
from model.tokenizer import CaptionTokenizer  # noqa: E402

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


def plain_loop(
    checkpoint: str, seeds: range, batch_size: int, steps: int | None, out: Path, bf16: bool, compile: str = "off"
) -> float:
    """Seeds/s of generate + PNG encode + sha256 + file write in one process, no Ray; every model
    call a full batch, as the actors make them (sampler.generate_seeds pads a short one)."""
    from pipeline.generation.sampler import generate_seeds

    ink = load_checkpoint(checkpoint)
    sampling.compile_model(ink.model, compile)
    generate_seeds(ink, list(seeds[:batch_size]), batch_size, steps=steps, bf16=bf16)  # warm-up (and compile)
    start = time.perf_counter()
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i : i + batch_size])
        samples = generate_seeds(ink, chunk, batch_size, steps=steps, bf16=bf16)
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
            bf16=args.bf16,
            compile=args.compile,
        )
        return run_generation(cfg)
    finally:
        if started:
            ray.shutdown()


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` on the current torch threads, best of `repeats`:
    the practical peak the model's FLOPs are measured against (bf16 uses AMX where the CPU has it)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def stage_ms(ink, batch_size: int, steps: int | None, bf16: bool, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` ms per batch of each stage of sampling.generate, run as it runs them."""
    model, tok = ink.model, ink.tokenizer
    seeds = list(range(batch_size))
    with sampling.autocast_context(model.device, bf16):
        noise = sampling._randn(sampling.seed_generators(seeds), model.config.z_dim, model.device)
        z = sampling._prior_sample(model, noise, steps)
        images = to_uint8(model.decode_image(z))
        captions = tok.decode(decode_tokens(model, z, punctuation=tok.punctuation_mask()))
        x = sampling.from_uint8(images, model.config.image_size, model.device)
        tokens = sampling._encode_tokens(tok, captions, model)
        stages = {
            "prior": lambda: sampling._prior_sample(model, noise, steps),
            "image_decoder": lambda: to_uint8(model.decode_image(z)),
            "caption": lambda: tok.decode(decode_tokens(model, z, punctuation=tok.punctuation_mask())),
            "alignment": lambda: sampling._alignment(model, x, tokens),
        }
        return {k: 1000 * min(_timed(fn) for _ in range(repeats)) for k, fn in stages.items()}


def print_model_loop(ink, args) -> None:
    """Section 2 of the module docstring."""
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak ({args.threads} threads, 2048^3): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    precision = "bf16" if args.bf16 else "fp32"
    ms = stage_ms(ink, args.batch_size, args.steps, args.bf16)
    macs = count_macs(ink.config.replace(ddim_steps=args.steps or ink.config.ddim_steps))
    flops = {
        "prior": 2 * macs["prior"],
        "image_decoder": 2 * macs["image_decoder"],
        "caption": 2 * macs["caption_decoder"],
        "alignment": 2 * (macs["image_encoder"] + macs["caption_encoder"]),
    }
    total_ms, total_flops = sum(ms.values()), sum(flops.values())
    print(f"model loop, {precision}, batch {args.batch_size}: {total_ms:.0f} ms per batch = "
          f"{1000 * args.batch_size / total_ms:.1f} seeds/s (model only)")  # fmt: skip
    for k in ms:
        rate = flops[k] * args.batch_size / (ms[k] / 1000) / 1e9
        print(f"  {k:14s} {ms[k]:7.1f} ms  {flops[k] / 1e9:6.3f} GFLOP/sample  {rate:6.1f} GFLOP/s")
    achieved = total_flops * args.batch_size / (total_ms / 1000) / 1e9
    print(f"  total          {total_ms:7.1f} ms  {total_flops / 1e9:6.3f} GFLOP/sample  {achieved:6.1f} GFLOP/s "
          f"= {achieved / peaks[precision]:.1%} of the {precision} matmul peak")  # fmt: skip


def print_compiled_loop(ink, args) -> None:
    """The stages again after torch.compile of the decoder and the prior, and the compile time
    (the first batch, as an actor's first batch pays it)."""
    seeds = list(range(args.batch_size))
    eager = ink.generate(seeds, steps=args.steps, autocast=args.bf16)
    sampling.compile_model(ink.model, args.compile)
    start = time.perf_counter()
    compiled = ink.generate(seeds, steps=args.steps, autocast=args.bf16)
    seconds = time.perf_counter() - start
    diff = int(abs(compiled.images.astype(int) - eager.images.astype(int)).max())
    same = sum(a == b for a, b in zip(compiled.captions, eager.captions))
    ms = stage_ms(ink, args.batch_size, args.steps, args.bf16)
    print(f"compiled ({args.compile}): first batch {seconds:.1f} s (compiling); then "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items())
          + f" = {sum(ms.values()):.0f} ms per batch; max pixel diff vs eager {diff}, captions equal {same}/{len(seeds)}")  # fmt: skip


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
    p.add_argument("--checkpoint", default="checkpoints/default")
    p.add_argument("--model", choices=("tiny", "micro"), default=None, help="an untrained model instead of --checkpoint")
    p.add_argument("--seeds", type=int, default=2000, help="seeds for the throughput comparison (0: skip it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in the loop and the actors")
    p.add_argument("--threads", type=int, default=sampling.available_cpus(), help="torch threads, in the loop and per actor")
    p.add_argument("--actors", type=int, nargs="+", default=[1], help="actor counts to measure")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[], help="e.g. 10000 100000")
    p.add_argument("--compile", default="off", choices=("off", "default", "max-autotune"),
                   help="also measure the model loop after sampling.compile_model (and its compile time)")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        return rss_child(args)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        checkpoint = args.checkpoint
        if args.model:
            checkpoint = str(Path(tmp, "ckpt"))
            make_checkpoint(Path(checkpoint), args.model)
        ink = load_checkpoint(checkpoint)
        steps = args.steps or ink.config.ddim_steps
        print(
            f"{args.model or checkpoint} ({ink.config.image_size} px), {steps} DDIM steps, batch {args.batch_size}, "
            f"{'bf16' if args.bf16 else 'fp32'}, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}"
        )
        print_model_loop(ink, args)
        if args.compile != "off":
            print_compiled_loop(ink, args)
        if args.seeds:
            loop_dir = Path(tmp, "loop")
            loop_dir.mkdir()
            loop = plain_loop(checkpoint, range(args.seeds), args.batch_size, args.steps, loop_dir, args.bf16, args.compile)
            print(f"raw loop: {loop:.1f} seeds/s over {args.seeds} seeds (generate, PNG, sha256, write)")
            for actors in args.actors:
                out = str(Path(tmp, f"pipe{actors}"))
                s = pipeline_run(checkpoint, args.seeds, args, out, actors)
                steady = steady_rate(out, args.batch_size)
                print(
                    f"pipeline, {actors} actor(s): {s['seeds_per_s']:.1f} seeds/s over {s['seconds']:.1f} s incl. "
                    f"actor start (ratio {s['seeds_per_s'] / loop:.2f}); steady state {steady:.1f} seeds/s "
                    f"(ratio {steady / loop:.2f})"
                )
        if args.rss_sizes:
            micro = str(Path(tmp, "micro"))
            make_checkpoint(Path(micro), "micro")
        for n in args.rss_sizes:
            cmd = [sys.executable, __file__, "--rss-child", str(n), "--checkpoint", micro, "--steps", "2"]
            cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            cmd += ["--shard-size", str(args.shard_size), "--actors", str(args.actors[-1])]
            result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(
                f"driver peak RSS, {n} seeds (micro model): {r['peak_rss_mib']:.0f} MiB "
                f"({r['seconds']:.0f} s, {r['seeds_per_s']:.0f} seeds/s, {r['manifest_rows']} rows)"
            )

if __name__ == "__main__":
    main()
