"""Where a checkpoint's Fréchet distance comes from (issue 13): the attribute probe's Fréchet
distance, as jobs.evaluate measures it, for generated images and for the decoder's reconstructions
of held-out images, each split into its mean term ||mu_a - mu_b||^2 and its covariance term.

    python benchmarks/frechet_sources.py --checkpoint checkpoints/default --data data/engravings

Reconstructions through the image-only and the joint posterior mean say how much of the distance
the image decoder makes by itself; generated minus reconstructed is what the latent prior adds.
The probe is the evaluation's own (read from <data>/.probe, trained there if missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.images import to_float, to_uint8  # noqa: E402
from pipeline.evaluation.batched import generate_batched  # noqa: E402
from pipeline.evaluation.metrics import frechet_distance  # noqa: E402
from pipeline.evaluation.probe import ProbeConfig  # noqa: E402
from pipeline.evaluation.probe_cache import get_probe  # noqa: E402
from pipeline.evaluation.real import load_real  # noqa: E402
from pipeline.evaluation.sections import _held_out_halves  # noqa: E402


def split_terms(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The Fréchet distance of two feature sets and its mean and covariance terms."""
    fd = frechet_distance(a, b)
    mean = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    return {"frechet": fd, "mean_term": mean, "cov_term": fd - mean}


@torch.inference_mode()
def reconstruct(ink, images: np.ndarray, captions: list[str] | None, batch_size: int = 64) -> np.ndarray:
    """uint8 held-out images -> uint8 decoder outputs at the posterior mean (image-only, or joint
    with `captions`)."""
    model, out = ink.model, []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size])
        tokens = None
        if captions is not None:
            tokens = ink.tokenizer.encode(captions[i : i + batch_size], model.config.max_caption_tokens)
        mu, _ = model.posterior(x, tokens)
        out.append(to_uint8(model.decode_image(mu)))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--data", default="data/engravings")
    ap.add_argument("--num-seeds", type=int, default=1000)
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sheet", help="also write a PNG: 8 held-out plates above their image-only reconstructions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ink = load_checkpoint(args.checkpoint)
    size = ink.model.config.image_size
    val = load_real(args.data, size, "val").labeled()
    probe = get_probe(args.data, replace(ProbeConfig(), image_size=size), val=val)
    a, b = _held_out_halves(len(val), args.num_seeds, args.seed_start)
    n = len(a)
    ref = probe.read(val.images[a])[1]
    sets = {
        "real (held-out B, the floor)": val.images[b],
        "reconstructed, image-only posterior mean (B)": reconstruct(ink, val.images[b], None),
        "reconstructed, joint posterior mean (B)": reconstruct(ink, val.images[b], [val.captions[i] for i in b]),
        "generated": generate_batched(ink, list(range(args.seed_start, args.seed_start + n)), 64).images,
    }
    floor = frechet_distance(probe.read(val.images[b])[1], ref)
    rows = {}
    for name, images in sets.items():
        row = split_terms(probe.read(images)[1], ref)
        rows[name] = {**row, "ratio": row["frechet"] / floor}
        print(f"{name:<48} FD {row['frechet']:7.2f} (mean {row['mean_term']:6.2f}, cov {row['cov_term']:6.2f})"
              f"  ratio {row['frechet'] / floor:.2f}", flush=True)  # fmt: skip
    if args.sheet:
        rec = sets["reconstructed, image-only posterior mean (B)"][:8]
        Image.fromarray(np.concatenate([np.concatenate(list(val.images[b][:8]), 1), np.concatenate(list(rec), 1)])).save(args.sheet)
    print(json.dumps({"checkpoint": args.checkpoint, "n": n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
