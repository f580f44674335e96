"""Decoder sharpening (issue 13): fine-tune only the image decoder of a trained checkpoint with an
adversarial term, everything else frozen, then evaluate it as the ablation does.

    python benchmarks/sharpen_decoder.py --checkpoint checkpoints/openmoji --out runs/sharpen/openmoji --cpu-minutes 10

Why a second stage: a decoder trained on a per-pixel loss paints the conditional mean of the
drawings its latent allows, a blur (sharpness 0.36 of real on OpenMoji). VQGAN and latent
diffusion's autoencoders add a PatchGAN term to the decoder for exactly this. Training it jointly
with the captions collapsed them (the ablation's detail_gan_bce: distinct 0.001), because the
adversarial gradient reached the shared latent. Here the encoders, the caption decoder, the
contrastive heads and the latent prior are frozen, so the latent, the captions and what the
prior samples stay exactly as they were; only z -> pixels changes.

Each step, on a batch of training drawings:
- reconstruction: the checkpoint's own image loss (the ink cross-entropy for checkpoints/openmoji,
  L1 + gradient L1 for checkpoints/default) on z sampled from the frozen joint posterior (keeps
  each image faithful to its latent, hence to its caption);
- adversarial: the PatchGAN hinge loss, with DiffAugment, on those reconstructions *and* on images
  decoded from a bank of latents the frozen prior sampled (what generation decodes), weighted by
  VQGAN's adaptive weight (the ratio of the two terms' gradient norms at the decoder's last layer);
- the discriminator has its own Adam (betas 0.5, 0.9) and learning rate, as in VQGAN.

The budget is process CPU seconds, as in benchmarks/ablate_openmoji.py. The result is a checkpoint
with the same config and size (the discriminator is not saved), so generation costs the same.
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

from ablate_openmoji import cost, evaluate, load_split  # noqa: E402

from model.adversarial import PatchDiscriminator, adversarial_terms  # noqa: E402
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.images import to_float, to_uint8  # noqa: E402
from model.networks import widen_decoder  # noqa: E402
from pipeline.evaluation.freeform import mean_gradient  # noqa: E402


@torch.no_grad()
def posterior_bank(model, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen joint posterior (mu, std) of every training pair."""
    mus, stds = [], []
    for i in range(0, len(x), 128):
        mu, logvar = model.posterior(x[i : i + 128], tokens[i : i + 128])
        mus.append(mu)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(mus), torch.cat(stds)


@torch.no_grad()
def prior_bank(model, count: int, seed: int) -> torch.Tensor:
    """`count` latents z sampled by the frozen prior (DDIM, the checkpoint's steps)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, model.latent_dim, generator=gen)
    out = [model.prior.sample(noise[i : i + 256], model.config.ddim_steps) for i in range(0, count, 256)]
    return model.split_latent(torch.cat(out))[0]


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last: torch.Tensor, cap: float) -> torch.Tensor:
    """VQGAN's lambda: |grad rec| / |grad adv| at the decoder's last layer (detached), at most
    `cap`: once reconstruction degrades its gradient grows, and an uncapped lambda runs away."""
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, cap).detach()


def reconstruction_loss(model, logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own image terms (ink cross-entropy, or L1 + gradient L1), as it was trained."""
    terms, w = model._image_terms(logits, real), model.config.loss_weights
    return sum(w[k] * terms[k] for k in ("image_l1", "image_grad", "image_bce") if w.get(k) and k in terms)


def sharpen(model, x, tokens, args) -> dict:
    """The fine-tune loop (module docstring); returns its numbers."""
    torch.manual_seed(args.seed)
    model.requires_grad_(False).eval()
    decoder = model.image_decoder
    decoder.requires_grad_(True).train()
    mu, std = posterior_bank(model, x, tokens)
    bank = prior_bank(model, args.prior_bank, args.seed)
    disc = PatchDiscriminator(tuple(args.disc_channels))
    new = list(decoder.wide.parameters())
    old = [p for p in decoder.parameters() if all(p is not q for q in new)]
    groups = [{"params": old, "lr": args.lr}] + ([{"params": new, "lr": args.new_lr}] if new else [])
    opt_g = torch.optim.Adam(groups, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))
    budget = args.cpu_minutes * 60 * 2
    c0, w0, step, log = time.process_time(), time.time(), 0, []
    b = args.batch_size
    while time.process_time() - c0 < budget:
        idx = torch.randint(len(x), (b,))
        real = x[idx]
        z = mu[idx] + torch.randn_like(std[idx]) * std[idx]
        z_prior = bank[torch.randint(len(bank), (b,))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            u = decoder.logits(torch.cat([z, z_prior]))  # (2B, S, S)
        recon, fake_prior = torch.tanh(u[:b]), torch.tanh(u[b:])
        rec = reconstruction_loss(model, u[:b], real)
        fakes = torch.cat([recon, fake_prior])
        d_loss, g_loss = adversarial_terms(disc, torch.cat([real, x[torch.randint(len(x), (b,))]]), fakes)
        warm = step >= args.warmup
        lam = adaptive_weight(rec, g_loss, decoder.out.weight, args.max_lambda) * args.adv_weight if warm else torch.zeros(())
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        (rec + lam * g_loss + d_loss).backward()  # each side's gradient reaches only its own weights
        opt_g.step()
        opt_d.step()
        step += 1
        if step % 100 == 0:
            sharp = mean_gradient(to_uint8(fake_prior.detach())) / mean_gradient(to_uint8(real))
            log.append({"step": step, "rec": rec.item(), "d": d_loss.item(), "g": g_loss.item(),
                        "lambda": float(lam), "prior_sharpness": sharp})  # fmt: skip
            print(f"  step {step}: rec {rec.item():.4f} d {d_loss.item():.3f} g {g_loss.item():.3f} "
                  f"lambda {float(lam):.3f} batch sharpness {sharp:.2f}", flush=True)  # fmt: skip
    decoder.requires_grad_(False).eval()
    return {"steps": step, "cpu_s": time.process_time() - c0, "wall_s": time.time() - w0, "log": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/openmoji")
    ap.add_argument("--data", default="data/openmoji")
    ap.add_argument("--out", default="runs/sharpen/openmoji")
    ap.add_argument("--cpu-minutes", type=float, default=10.0, help="budget: minutes of both cores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--decoder-widths", type=int, nargs="+", default=None,
                    help="widen the decoder first (ModelConfig.decoder_widths, zero-init: the same function)")
    ap.add_argument("--new-lr", type=float, default=5e-4, help="learning rate of the added wide blocks")
    ap.add_argument("--disc-lr", type=float, default=2e-4)
    ap.add_argument("--disc-channels", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--adv-weight", type=float, default=0.5, help="times the adaptive weight")
    ap.add_argument("--max-lambda", type=float, default=0.1, help="cap of the adaptive weight")
    ap.add_argument("--warmup", type=int, default=200, help="discriminator-only steps before the decoder's term")
    ap.add_argument("--prior-bank", type=int, default=4096, help="prior latents decoded as fakes")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--num-seeds", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.checkpoint)
    captions, images = load_split(Path(args.data))
    x = to_float(images)
    tokens = ck.tokenizer.encode(captions, ck.model.config.max_caption_tokens)
    if args.decoder_widths:
        ck.model = widen_decoder(ck.model, args.decoder_widths)
    stats = sharpen(ck.model, x, tokens, args)
    record = {k: v for k, v in stats.items() if k != "log"} | {"from": args.checkpoint, "args": vars(args)}
    # A checkpoint sharpened again keeps the records of its earlier runs, oldest first.
    earlier = ck.extra.get("sharpen_earlier", []) + ([ck.extra["sharpen"]] if "sharpen" in ck.extra else [])
    extra = {**ck.extra, "sharpen": record, "sharpen_earlier": earlier}
    save_checkpoint(args.out, ck.model, ck.tokenizer, extra=extra)
    Path(args.out + "-log.json").write_text(json.dumps(stats["log"], indent=1))
    if args.skip_eval:
        return
    result = {**evaluate(Path(args.out), args.data, args.num_seeds), **cost(Path(args.out), args.threads)}
    print(json.dumps(result, indent=1))
    Path(args.out + "-result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
