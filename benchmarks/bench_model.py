"""Cost and speed of the joint model, per preset.

    python benchmarks/bench_model.py                      # all presets, speed for tiny and base
    python benchmarks/bench_model.py --presets base --batch 32 --json out.json
    python benchmarks/bench_model.py --checkpoint ck/     # speed + bf16 agreement of a trained model

Prints, per preset: parameter count (per component), multiply-accumulates per generated sample
(prior DDIM steps + image decoder + caption decoding with the KV cache + the two encoders for the
alignment score; counted with torch.utils.flop_counter on the meta device, MACs = FLOPs / 2) and
per training sample (forward + backward ~ 3x forward), and for tiny/base the measured generation
seeds/s and training samples/s on this CPU in fp32 and under bf16 autocast, plus how closely bf16
outputs match fp32 ones (max pixel difference, share of identical captions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import sampling  # noqa: E402
from model.config import PRESETS, ModelConfig, get_preset  # noqa: E402
from model.networks import JointModel  # noqa: E402

VOCAB = 100  # the grammar's vocabulary is ~80 words + 4 specials
CAPTION_TOKENS = 24  # a typical caption incl. bos/eos: decoding steps per sample


def _macs(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 2


def count_macs(cfg: ModelConfig, caption_tokens: int = CAPTION_TOKENS) -> dict[str, float]:
    """MACs per generated sample and per training sample, by component (meta device: no compute)."""
    with torch.device("meta"):
        m = JointModel(cfg, VOCAB).eval()
    s, d = cfg.image_size, cfg.z_dim
    z = torch.zeros(1, d, device="meta")  # also what the prior diffuses
    img = torch.zeros(1, s, s, device="meta")
    tok = torch.zeros(1, caption_tokens, dtype=torch.long, device="meta")
    full = torch.zeros(1, cfg.max_caption_tokens, dtype=torch.long, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    out: dict[str, float] = {}
    with torch.no_grad():
        out["prior_per_step"] = _macs(lambda: m.prior(z, t))
        out["prior"] = out["prior_per_step"] * cfg.ddim_steps
        out["image_decoder"] = _macs(lambda: m.decode_image(z))

        def decode():
            _, cache = m.caption_decoder.start(z)
            for pos in range(1, caption_tokens - 1):
                _, cache = m.caption_decoder.step(tok[:, 0], pos, cache)

        out["caption_decoder"] = _macs(decode)
        out["image_encoder"] = _macs(lambda: m.encode_image(img))
        out["caption_encoder"] = _macs(lambda: m.encode_caption(tok))
        out["generate_total"] = sum(
            out[k] for k in ("prior", "image_decoder", "caption_decoder", "image_encoder", "caption_encoder")
        )
        train_fwd = _macs(
            lambda: (
                m.encode_image(img),
                m.encode_caption(full),
                m.decode_image(z),
                m.caption_decoder(z, full[:, :-1]),
            )
        )
        out["train_forward"] = train_fwd
        out["train_total"] = 3 * train_fwd  # backward ~ 2x forward
    return out


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        m = JointModel(cfg, VOCAB)
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in m.named_children()}
    counts["total"] = sum(p.numel() for p in m.parameters())
    return counts


def _best_rate(fn, n: int, repeats: int) -> tuple[float, float]:
    """(items per wall second, items per process CPU second), best of `repeats` after a warm-up.

    The CPU-time rate is robust to other processes sharing the machine: on an otherwise idle
    host, wall throughput with T threads is at most T x the 1-thread CPU-time rate.
    """
    fn()  # warm-up (oneDNN primitive creation)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return n / best_wall, n / max(best_cpu, 1e-9)


def measure_speed(model: JointModel, tok, batch: int, repeats: int, steps: int | None) -> dict[str, float]:
    """Seeds/s of generate() and samples/s of a training step, fp32 and bf16 autocast."""
    cfg = model.config
    res: dict[str, float] = {}
    seeds = list(range(batch))
    outs = {}
    for bf16 in (False, True):
        key = "bf16" if bf16 else "fp32"
        outs[key] = sampling.generate(model, tok, seeds, steps=steps, autocast=bf16)
        res[f"generate_seeds_per_s_{key}"], res[f"generate_seeds_per_cpu_s_{key}"] = _best_rate(
            lambda bf16=bf16: sampling.generate(model, tok, seeds, steps=steps, autocast=bf16), batch, repeats
        )
    a, b = outs["fp32"], outs["bf16"]
    res["bf16_max_pixel_diff"] = float(np.abs(a.images.astype(int) - b.images.astype(int)).max())
    res["bf16_mean_pixel_diff"] = float(np.abs(a.images.astype(int) - b.images.astype(int)).mean())
    res["bf16_same_caption_share"] = float(np.mean([x == y for x, y in zip(a.captions, b.captions)]))

    images = torch.rand(batch, cfg.image_size, cfg.image_size) * 2 - 1
    tokens = torch.randint(4, tok.vocab_size if tok else VOCAB, (batch, cfg.max_caption_tokens))
    tokens[:, 0], tokens[:, 20:] = 1, 0
    tokens[:, 19] = 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    for bf16 in (False, True):
        key = "bf16" if bf16 else "fp32"

        def step(bf16: bool = bf16) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(images, tokens)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        res[f"train_samples_per_s_{key}"], res[f"train_samples_per_cpu_s_{key}"] = _best_rate(
            step, batch, repeats
        )
    model.eval()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--speed-presets", nargs="*", default=["tiny", "base"])
    ap.add_argument("--checkpoint", help="measure speed and bf16 agreement on this trained checkpoint")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the config's)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results: dict[str, dict] = {}
    for name in args.presets:
        cfg = get_preset(name)
        macs = count_macs(cfg)
        params = param_counts(cfg)
        results[name] = {"params": params, "macs": macs}
        print(f"== {name}: {cfg.image_size}px, z {cfg.z_dim}, channels {list(cfg.channels)}")
        print(
            f"   params {params['total'] / 1e6:.2f} M  ("
            + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items() if k != "total")
            + ")"
        )
        print(
            f"   MACs per generated sample {macs['generate_total'] / 1e6:.1f} M  (prior {cfg.ddim_steps} steps "
            f"{macs['prior'] / 1e6:.1f}M, image decoder {macs['image_decoder'] / 1e6:.1f}M, caption decoder "
            f"{macs['caption_decoder'] / 1e6:.1f}M, encoders {(macs['image_encoder'] + macs['caption_encoder']) / 1e6:.1f}M)"
        )
        print(
            f"   MACs per training sample ~{macs['train_total'] / 1e6:.1f} M (3x forward {macs['train_forward'] / 1e6:.1f}M)"
        )
        if name in (args.speed_presets or []) and not args.checkpoint:
            from model.tokenizer import CaptionTokenizer

            tok = CaptionTokenizer.train([" ".join(f"w{i}" for i in range(VOCAB - 4))])
            model = JointModel(cfg, tok.vocab_size).eval()
            speed = measure_speed(model, tok, args.batch, args.repeats, args.steps)
            results[name]["speed"] = speed
            _print_speed(speed, args)
    if args.checkpoint:
        from model.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint)
        speed = measure_speed(ck.model, ck.tokenizer, args.batch, args.repeats, args.steps)
        results["checkpoint"] = {"path": args.checkpoint, "digest": ck.digest, "speed": speed}
        print(f"== checkpoint {args.checkpoint} ({ck.config.image_size}px)")
        _print_speed(speed, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _print_speed(speed: dict[str, float], args) -> None:
    def both(kind: str) -> str:
        return ", ".join(
            f"{speed[f'{kind}_per_s_{p}']:.1f}/s {p} ({speed[f'{kind}_per_cpu_s_{p}']:.1f} per CPU-s)"
            for p in ("fp32", "bf16")
        )

    print(f"   generation (batch {args.batch}, {args.threads} threads): seeds " + both("generate_seeds"))
    print(
        f"   bf16 vs fp32: max pixel diff {speed['bf16_max_pixel_diff']:.0f}/255, mean "
        f"{speed['bf16_mean_pixel_diff']:.2f}, same caption {speed['bf16_same_caption_share']:.0%}"
    )
    print("   training: samples " + both("train_samples"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"   (load average {load:.1f} on {os.cpu_count()} CPUs while measuring)")


if __name__ == "__main__":
    main()
