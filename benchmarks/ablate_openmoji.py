"""The decoder ablation of docs/quality.md: candidate designs trained on OpenMoji for the same
CPU time, then measured with the evaluation job and costed.

    export INKSEED_OPENMOJI="$(bash scripts/fetch_openmoji.sh)"
    python -m jobs.prepare_data --source openmoji --out data/openmoji --size 64
    python benchmarks/ablate_openmoji.py --candidates today noise_gan detail --cpu-minutes 20
    python benchmarks/ablate_openmoji.py --candidates detail --cpu-minutes 20 --threads 2   # one at a time

Every candidate is the `base` preset at 64 px plus its ModelConfig changes (CANDIDATES), trained
in this process (no Ray, so the budget is the model's alone) with the recipe of
configs/openmoji.yaml: AdamW, peak lr 2e-3 after 200 warmup steps, cosine to 5%, batch 32, bf16
autocast, the *last* weights kept (a generator should fit its drawings; val loss on unseen ones
rises as it does). The budget is process CPU seconds (`--cpu-minutes` x 60 x 2 cores), not wall
time, so candidates trained side by side, or beside other work, get the same compute. Then the
latent prior is fitted (400 epochs), the checkpoint saved to OUT/<name>, `jobs.evaluate` run on
1,000 seeds, and the cost measured: FLOPs per generated sample (bench_model.count_macs) and ms per
seed of `generate` at batch 64, fp32, on one thread. Prints one markdown row per candidate and
writes OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import count_macs  # noqa: E402

from jobs.ray_owner import run_owning_ray  # noqa: E402
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.config import ModelConfig, get_preset  # noqa: E402
from model.images import to_uint8  # noqa: E402
from model.networks import JointModel  # noqa: E402
from model.sampling import generate  # noqa: E402
from model.tokenizer import CaptionTokenizer  # noqa: E402
from pipeline.data.sources import split_of  # noqa: E402
from pipeline.evaluation.config import EvaluateConfig  # noqa: E402
from pipeline.evaluation.freeform import mean_gradient  # noqa: E402
from pipeline.evaluation.run import run_evaluation  # noqa: E402

# name -> (what it is, ModelConfig changes to the base preset at 64 px)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "today": ("today's decoder: z -> convs + texture bank, L1 + gradient L1", {}),
    "noise_gan": (
        "+ seed noise maps + PatchGAN hinge (0.1) with DiffAugment",
        {"noise_maps": True, "disc_channels": (32, 64, 128), "adversarial_start": 500},
    ),
    "detail": ("+ spatial detail latent 4x8x8, diffused jointly with z by the prior", {"detail_channels": 4}),
    "detail_gan": (
        "detail latent + noise maps + PatchGAN",
        {"detail_channels": 4, "noise_maps": True, "disc_channels": (32, 64, 128), "adversarial_start": 500},
    ),
}
# Round 2: the same decoders with the ink cross-entropy instead of L1 + gradient L1, which on
# sparse line art saturate to blank paper (round 1: every decoder's images were empty).
BCE = {"loss_weights": {"image_l1": 0.0, "image_grad": 0.0, "image_bce": 1.0}}
CANDIDATES.update({
    "today_bce": ("today's decoder, ink cross-entropy", BCE),
    "detail_bce": ("detail latent, ink cross-entropy", {**CANDIDATES["detail"][1], **BCE}),
    "detail_gan_bce": ("detail latent + noise maps + PatchGAN, ink cross-entropy", {**CANDIDATES["detail_gan"][1], **BCE}),
})  # fmt: skip
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


def load_split(root: Path) -> tuple[list[str], np.ndarray]:
    """The train split's captions and images (uint8 (N, S, S)) of an image-folder dataset."""
    from PIL import Image

    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if split_of(r["file_name"]) == "train"]
    images = np.stack([np.asarray(Image.open(root / r["file_name"]).convert("L")) for r in rows])
    return [r["text"] for r in rows], images


def lr_at(step: int, frac: float, peak: float, warmup: int = 200, floor: float = 0.05) -> float:
    """Linear warmup over `warmup` steps, then cosine from peak to floor x peak over the budget."""
    return peak * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_autoencoder(model: JointModel, x: torch.Tensor, tokens: torch.Tensor, cpu_budget: float, args) -> dict:
    """Phase 1 for a budget of process CPU seconds; returns steps, CPU and wall seconds."""
    params = [p for n, p in model.named_parameters() if not n.startswith("prior.")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    w0, c0, step = time.time(), time.process_time(), 0
    model.train()
    while (frac := (time.process_time() - c0) / cpu_budget) < 1:
        for idx in torch.randperm(len(x)).split(args.batch_size):
            frac = (time.process_time() - c0) / cpu_budget
            if frac >= 1 or len(idx) < args.batch_size:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, frac, args.lr)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x[idx], tokens[idx])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 500 == 0:
                print(f"  step {step}: loss {out['loss'].item():.4f} l1 {out['image_l1'].item():.4f}", flush=True)
    return {"steps": step, "train_cpu_s": time.process_time() - c0, "train_wall_s": time.time() - w0}


def fit_prior(model: JointModel, latents: torch.Tensor, epochs: int, batch: int = 256) -> float:
    """Phase 2 as in pipeline/training/prior_phase.py, single process; returns the last loss."""
    model.fit_latent_stats(latents)
    prior = model.prior.requires_grad_(True).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-3, weight_decay=0.0)
    steps = epochs * max(1, len(latents) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.prior_loss(latents[torch.randint(len(latents), (batch,), generator=gen)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()
        sched.step()
    prior.requires_grad_(False)
    return float(loss)


def train_candidate(name: str, changes: dict, captions: list[str], images: np.ndarray, args) -> dict:
    """Train one candidate, save its checkpoint to OUT/<name>; returns its training numbers."""
    torch.manual_seed(args.seed)
    tok = CaptionTokenizer.train(captions)
    cfg: ModelConfig = get_preset("base").with_image_size(images.shape[-1]).replace(**changes)
    model = JointModel(cfg, tok.vocab_size)
    x = torch.from_numpy(images).float() / 127.5 - 1
    tokens = tok.encode(captions, cfg.max_caption_tokens)
    stats = train_autoencoder(model, x, tokens, args.cpu_minutes * 60 * 2, args)
    model.eval()
    with torch.no_grad():
        latents = torch.cat([model.prior_latents(x[i : i + 128], tokens[i : i + 128]) for i in range(0, len(x), 128)])
        z, detail = model.split_latent(latents)
        recon = to_uint8(torch.cat([model.decode_image(z[i : i + 128], None if detail is None else detail[i : i + 128])
                                    for i in range(0, len(z), 128)]))  # fmt: skip
    stats["recon_sharpness"] = mean_gradient(recon) / mean_gradient(images)
    t0 = time.time()
    stats["prior_loss"] = fit_prior(model, latents, args.prior_epochs)
    stats["prior_wall_s"] = time.time() - t0
    save_checkpoint(Path(args.out) / name, model, tok, extra={"ablation": {"candidate": name, **stats}})
    return stats


def cost(path: Path, threads: int) -> dict:
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


def evaluate(path: Path, data: str, num_seeds: int) -> dict:
    """jobs.evaluate on the candidate; returns the REPORT_KEYS of its report."""
    report = run_owning_ray(run_evaluation, EvaluateConfig(checkpoint=str(path), data=data, out=str(path) + "-eval",
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
    cells = [name, f"{r['steps']}", f"{r['train_cpu_s'] / 60:.0f}", f"{r['recon_sharpness']:.2f}"]
    cells += [("-" if r[k] is None else f"{r[k]:.3f}") for k in REPORT_KEYS]
    cells += [f"{r['gflop_per_sample']:.2f}", f"{r['ms_per_seed']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--data", default="data/openmoji")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--cpu-minutes", type=float, default=20.0, help="training budget: minutes of both cores")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--prior-epochs", type=int, default=400)
    ap.add_argument("--num-seeds", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-training", action="store_true", help="evaluate checkpoints already in OUT")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    captions, images = load_split(Path(args.data))
    results = {}
    for name in args.candidates:
        path = Path(args.out) / name
        print(f"== {name}: {CANDIDATES[name][0]}", flush=True)
        if args.skip_training:
            stats = load_checkpoint(path).extra["ablation"]
        else:
            stats = train_candidate(name, CANDIDATES[name][1], captions, images, args)
        results[name] = {**stats, **evaluate(path, args.data, args.num_seeds), **cost(path, args.threads)}
        (Path(args.out) / "ablation.json").write_text(json.dumps(results, indent=2))
    keys = ["candidate", "steps", "CPU min", "recon sharpness", *REPORT_KEYS, "GFLOP/sample", "ms/seed"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for name, r in results.items():
        print(row(name, r))


if __name__ == "__main__":
    main()
