"""The real-data ablation of docs/quality.md: candidate training configs run through the product's
own trainer (`jobs.train`'s run_training: every phase, on Ray Train), then measured with the
evaluation job and costed.

    export INKSEED_OPENMOJI="$(bash scripts/fetch_openmoji.sh)"
    python -m jobs.prepare_data --source openmoji --out data/openmoji --size 64
    python benchmarks/ablate_openmoji.py                                  # every candidate
    python benchmarks/ablate_openmoji.py --candidates recipe no_sharpen   # some

Every candidate is configs/openmoji.yaml (the recipe that makes checkpoints/openmoji) with its
TrainConfig changes (CANDIDATES), trained in its own run `<out>/<name>` (a rerun resumes it, or
only re-exports a finished one). Then `jobs.evaluate` runs on 1,000 seeds and the cost is
measured: FLOPs per generated sample (bench_model.count_macs) and ms per seed of `generate` at
batch 64, fp32, on one thread. Prints one markdown row per candidate and writes
<out>/ablation.json. The candidates the first ablation rejected (a spatial detail latent, noise
maps, an in-model PatchGAN) left the code; their numbers stay in docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import count_macs  # noqa: E402

from jobs.ray_owner import run_owning_ray  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.sampling import generate  # noqa: E402
from pipeline.evaluation.config import EvaluateConfig  # noqa: E402
from pipeline.evaluation.run import run_evaluation  # noqa: E402
from pipeline.training.config import TrainConfig, load_train_config  # noqa: E402
from pipeline.training.driver import run_training  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "openmoji.yaml"
# name -> (what it is, TrainConfig changes to configs/openmoji.yaml)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "recipe": ("configs/openmoji.yaml as committed", {}),
    "no_sharpen": ("the same without phase 3 (decoder sharpening)", {"sharpen": {"steps": 0}}),
    "l1": (
        "L1 + gradient L1 instead of the ink cross-entropy (round 1's loss)",
        {"loss_weights": {"image_l1": 1.0, "image_grad": 1.0, "image_bce": 0.0}},
    ),
    "wide": ("+ wide decoder blocks at 16 and 32 px", {"model": {"decoder_widths": [0, 0, 128, 128, 0]}}),
}
REPORT_KEYS = {
    "retrieval.ratio": ("retrieval", "ratio"),
    "fidelity.ratio": ("fidelity", "ratio"),
    "sharpness_ratio": ("realism", "sharpness_ratio"),
    "repeated_ngram_share": ("captions", "repeated_ngram_share"),
    "distinct_share": ("captions", "distinct_share"),
    "novel_share": ("captions", "novel_share"),
    "vocab_known_share": ("captions", "vocab_known_share"),
    "i2t": ("conditional", "caption", "retrieval"),
    "t2i": ("conditional", "illustrate", "retrieval"),
}


def candidate_config(name: str, data: str, out: str) -> TrainConfig:
    """configs/openmoji.yaml with the candidate's changes, in run `<out>/<name>`."""
    base = load_train_config(str(RECIPE))
    changes = dict(CANDIDATES[name][1])
    if "sharpen" in changes:
        changes["sharpen"] = {**base.to_dict()["sharpen"], **changes["sharpen"]}
    return base.replace(data=data, storage_path=out, name=name, **changes)


def cost(path: str, threads: int) -> dict:
    """GFLOPs per generated sample and ms per seed of generate() at batch 64, fp32, 1 thread
    (torch goes back to `threads` afterwards)."""
    ck = load_checkpoint(path)
    torch.set_num_threads(1)
    seeds = list(range(64))
    generate(ck.model, ck.tokenizer, seeds)  # warm-up
    best = min(_timed(lambda: generate(ck.model, ck.tokenizer, seeds)) for _ in range(3))
    torch.set_num_threads(threads)
    return {"gflop_per_sample": count_macs(ck.model.config)["generate_total"] * 2 / 1e9, "ms_per_seed": best * 1000 / 64}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def evaluate(path: str, data: str, num_seeds: int) -> dict:
    """jobs.evaluate on the candidate; returns the REPORT_KEYS of its report."""
    report = run_owning_ray(run_evaluation, EvaluateConfig(checkpoint=path, data=data, out=path + "-eval",
                                                           num_seeds=num_seeds))  # fmt: skip
    out = {}
    for key, where in REPORT_KEYS.items():
        node = report
        for part in where:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        out[key] = node if isinstance(node, (int, float)) else None
    out["determinism_mismatches"] = report.get("determinism", {}).get("mismatches")
    return out


def row(name: str, r: dict) -> str:
    cells = [name, f"{r['train_wall_s'] / 60:.0f}"]
    cells += [("-" if r[k] is None else f"{r[k]:.3f}") for k in REPORT_KEYS]
    cells += [f"{r['gflop_per_sample']:.2f}", f"{r['ms_per_seed']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--data", default="data/openmoji")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    ap.add_argument("--num-seeds", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.candidates:
        print(f"== {name}: {CANDIDATES[name][0]}", flush=True)
        t0 = time.time()
        export = run_owning_ray(run_training, candidate_config(name, args.data, args.out))
        results[name] = {"train_wall_s": time.time() - t0, **evaluate(export, args.data, args.num_seeds),
                         **cost(export, args.threads)}  # fmt: skip
        (Path(args.out) / "ablation.json").write_text(json.dumps(results, indent=2))
    keys = ["candidate", "train min", *REPORT_KEYS, "GFLOP/sample", "ms/seed"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for name, r in results.items():
        print(row(name, r))


if __name__ == "__main__":
    main()
