"""Training throughput on Ray Train (pipeline/training/): samples/s and achieved GFLOP/s against
this machine's matmul peak, for each worker layout. Not a test: it prints numbers.

    python benchmarks/bench_train.py                                    # base at 128 px, 1x2 and 2x1
    python benchmarks/bench_train.py --layouts 1x2 2x1 --samples 2048 --epochs 2

Each layout is W workers x T torch threads (W * T = the machine's cores for a fair comparison). A
short real run of jobs.train's code (`run_training`) on --data: --epochs epochs over --samples
training rows, a tiny prior phase; samples/s is the workers' own count over their training time
(the last epoch's, so the first epoch's warm-up is left out when --epochs > 1). FLOPs per training
sample are bench_model.count_macs' (forward + backward ~ 3x forward, 2 FLOPs per MAC); the peak
is bench_generate's matmul peak of the precision (bf16 autocast, as configs/base.yaml trains).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import matmul_peak  # noqa: E402
from bench_model import count_macs  # noqa: E402

from pipeline.training.config import TrainConfig, model_config  # noqa: E402
from pipeline.training.driver import run_training  # noqa: E402


def run_layout(args, workers: int, threads: int, root: str) -> dict:
    """One short training run; the last epoch's perf metrics."""
    import ray

    cfg = TrainConfig(
        data=args.data, preset=args.preset, name=f"bench-{workers}x{threads}", storage_path=root,
        num_workers=workers, cpus_per_worker=threads, torch_threads=threads, epochs=args.epochs,
        batch_size=args.batch_size, max_train_samples=args.samples, max_val_samples=64, prior_epochs=1,
        log_samples=0, wandb_mode="disabled", precision=args.precision, check_resources=False,
    )  # fmt: skip
    ray.init(num_cpus=max(2, workers * threads), include_dashboard=False, log_to_driver=False)
    try:
        run_training(cfg)
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (Path(root) / cfg.name / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "epoch"][-1]
    return {"samples_per_s": last["perf/samples_per_s"], "train_time_s": last["perf/train_time_s"],
            "epoch_time_s": last["perf/epoch_time_s"], "cfg": cfg}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/engravings")
    p.add_argument("--preset", default="base")
    p.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="WORKERSxTHREADS")
    p.add_argument("--samples", type=int, default=1024, help="training rows per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    args = p.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"error: {args.data} does not exist: python -m jobs.prepare_data --out {args.data} --count 20000 --size 128")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for layout in args.layouts:
            workers, threads = map(int, layout.split("x"))
            results[layout] = run_layout(args, workers, threads, root)
    cfg = next(iter(results.values()))["cfg"]
    mc = model_config(cfg)
    flops = 2 * count_macs(mc)["train_total"]  # per training sample
    torch.set_num_threads(max(w * t for w, t in (map(int, x.split("x")) for x in args.layouts)))
    peak = matmul_peak(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    print(f"\ntraining throughput, preset {args.preset} at {mc.image_size} px, batch {args.batch_size} per worker, "
          f"{args.precision}; {flops / 1e9:.2f} GFLOP per training sample; matmul peak {peak:.0f} GFLOP/s")  # fmt: skip
    print("| workers x threads | samples/s | achieved GFLOP/s | share of peak | epoch s (train s) |")
    print("|---|---|---|---|---|")
    for layout, r in results.items():
        achieved = r["samples_per_s"] * flops / 1e9
        print(f"| {layout} | {r['samples_per_s']:.1f} | {achieved:.0f} | {achieved / peak:.1%} | "
              f"{r['epoch_time_s']:.0f} ({r['train_time_s']:.0f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
