"""Phase 3 of training: decoder sharpening, data parallel (DDP) like the other phases.

Why: a decoder trained on a per-pixel loss paints the conditional mean of the drawings its latent
allows, a blur (OpenMoji: sharpness 0.36 of the real drawings'). VQGAN's and latent diffusion's
autoencoders add a PatchGAN term to the decoder for exactly this. Trained jointly with the
captions, the adversarial gradient reached the shared latent and the captions collapsed
(docs/quality.md, the ablation's detail_gan_bce). So here only z -> pixels trains: the encoders,
the caption decoder, the contrastive heads and the latent prior are frozen, and the latent a seed
lands on, its caption and its alignment score stay exactly what phases 1 and 2 made.

Each step, on a batch of 2B training pairs of this worker's shard:
1. z of the first B pairs sampled from the frozen joint posterior, and B latents from a bank the
   frozen prior sampled once (DDIM, as generation does), decoded in one forward (DDP);
2. the reconstruction term: the model's own image loss (ModelConfig.loss_weights: L1 + gradient
   L1 for the engravings, the ink cross-entropy for line art) on the B reconstructions;
3. the PatchGAN hinge terms (model/adversarial.py), with DiffAugment, of all 2B real images
   against the 2B decoded ones; the discriminator is its own DDP module with its own Adam;
4. the decoder's adversarial term weighted by VQGAN's adaptive weight |grad rec| / |grad adv| at
   the decoder's last layer, capped at `max_weight`, times `adv_weight`; off for the first
   `warmup_steps` (the discriminator learns alone first);
5. one backward of rec + weight x adv + disc: each side's gradient reaches only its own weights.

Checkpoints every `checkpoint_every` steps hold the decoder, the discriminator, both optimizers
and `sharpen_step`; a failure resumes from there (the schedule is the step count: the warmup and
the step budget continue; the data order of the resumed steps is drawn anew from (seed, step)).
The discriminator is never exported: the checkpoint a run exports costs what it did.
"""

from __future__ import annotations

import time
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn

from model.adversarial import PatchDiscriminator, adversarial_terms
from model.images import to_uint8
from model.networks import JointModel
from pipeline.evaluation.freeform import mean_gradient
from pipeline.training.config import SHUFFLE_BATCHES, SharpenConfig
from pipeline.training.distributed import all_reduce_means
from pipeline.training.faults import maybe_fail
from pipeline.training.metrics_log import RunLogger
from pipeline.training.state import CheckpointParts, Phase, Restored, SharpenParts, TrainState, report


class DecoderLogits(nn.Module):
    """The image decoder's pre-tanh output as a module's forward, so DDP can wrap it."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(z)  # (B, S, S)


@torch.no_grad()
def prior_bank(model: JointModel, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` latents z (count, z_dim) sampled by the frozen prior from seeded noise."""
    noise = torch.randn(count, model.config.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return torch.cat([model.prior.sample(chunk, model.config.ddim_steps) for chunk in noise.split(512)])


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last: torch.Tensor, cap: float) -> torch.Tensor:
    """VQGAN's lambda: |grad rec| / |grad adv| at the decoder's last layer, detached, at most `cap`."""
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, cap).detach()


def sharpen_decoder(
    model: JointModel,
    shard: ray.data.DataIterator,
    parts: CheckpointParts,
    device: torch.device,
    amp: bool,
    log: RunLogger | None,
    restored: Restored | None,
    failures: dict[str, int],
    resumed_phase: Phase | None,
) -> dict[str, float]:
    """Run phase 3 up to `cfg.sharpen.steps` (module docstring); returns its summary metrics."""
    cfg, sc, state = parts.cfg, parts.cfg.sharpen, parts.state
    rank = ray.train.get_context().get_world_rank()
    t0, start = time.perf_counter(), state.sharpen_step
    # 1. Freeze everything but the decoder; the same discriminator init on every rank.
    model.requires_grad_(False).eval()
    decoder = model.image_decoder
    decoder.requires_grad_(True).train()
    torch.manual_seed(cfg.seed + 1)
    disc = PatchDiscriminator(tuple(sc.disc_channels)).to(device)
    opt_g = torch.optim.Adam(decoder.parameters(), lr=sc.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=sc.disc_lr, betas=(0.5, 0.9))
    resumed = restored is not None and restored.sharpen is not None  # mid-phase, or a finished run sharpening on
    if resumed:
        disc.load_state_dict(restored.sharpen["discriminator"])
        opt_g.load_state_dict(restored.sharpen["decoder"])
        opt_d.load_state_dict(restored.sharpen["disc"])
    state.phase, parts.sharpen = "sharpen", SharpenParts(disc, opt_g, opt_d)
    dec_ddp, disc_ddp = (ray.train.torch.prepare_model(m) for m in (DecoderLogits(decoder), disc))
    bank = prior_bank(model, sc.prior_bank, cfg.seed * 1_000 + rank, device)
    if not resumed:  # a failure from here on keeps the fitted prior
        report(_metrics(state, {}), rank, parts, dir_name="sharpen-000000")

    # 2. Steps until the budget, over as many passes of the shard as that takes.
    sums: dict[str, float] = {}
    while state.sharpen_step < sc.steps:
        torch.manual_seed(cfg.seed * 100_003 + 7_919 * state.sharpen_step + rank)  # a resume draws anew
        batches = shard.iter_torch_batches(
            batch_size=2 * cfg.batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * cfg.batch_size, local_shuffle_seed=cfg.seed * 1_000 + state.sharpen_step,
        )  # fmt: skip
        for batch in batches:
            m = sharpen_step(model, dec_ddp, disc_ddp, disc, parts.sharpen, batch, bank, sc, state.sharpen_step, amp)
            state.sharpen_step += 1
            sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
            if log and (state.sharpen_step % cfg.log_every == 0 or state.sharpen_step == sc.steps):
                log.log({**{f"sharpen/{k}": v for k, v in m.items()}, "sharpen/step": state.sharpen_step,
                         "global_step": state.global_step}, kind="sharpen")  # fmt: skip
            if state.sharpen_step % sc.checkpoint_every == 0 and state.sharpen_step < sc.steps:
                report(_metrics(state, m), rank, parts, dir_name=f"sharpen-{state.sharpen_step:06d}")
                maybe_fail(failures, "sharpen_step", state.sharpen_step, resumed_phase)
            if state.sharpen_step >= sc.steps:
                break
    decoder.requires_grad_(False).eval()
    done = max(1, state.sharpen_step - start)
    means = all_reduce_means({k: torch.tensor(v, device=device) for k, v in sums.items()}, done, device)
    return {**{f"sharpen/mean_{k}": v for k, v in means.items()}, "sharpen/steps": float(state.sharpen_step),
            "sharpen/start_step": float(start), "sharpen/time_s": time.perf_counter() - t0,
            "sharpen_step": state.sharpen_step}  # fmt: skip


def sharpen_step(
    model: JointModel,
    dec_ddp: nn.Module,
    disc_ddp: nn.Module,
    disc: PatchDiscriminator,
    sp: SharpenParts,
    batch: dict[str, torch.Tensor],
    bank: torch.Tensor,
    sc: SharpenConfig,
    step: int,
    amp: bool,
) -> dict[str, float]:
    """One optimizer step of both sides (module docstring, steps 1-5); returns its scalars."""
    real, tokens = batch["image"].float(), batch["tokens"]  # (2B, S, S), (2B, T)
    b = real.shape[0] // 2
    device_type = real.device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        mu, logvar = model.posterior(real[:b], tokens[:b])  # (B, D) each, frozen
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    z_prior = bank[torch.randint(len(bank), (b,), device=bank.device)]
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        u = dec_ddp(torch.cat([z, z_prior])).float()  # (2B, S, S)
    rec = model.image_loss(u[:b], real[:b])
    fakes = torch.tanh(u)
    d_loss, g_loss = adversarial_terms(disc, real, fakes, augment=sc.diff_augment, forward=disc_ddp)
    if step >= sc.warmup_steps and sc.adv_weight > 0:
        weight = adaptive_weight(rec, g_loss, model.image_decoder.out.weight, sc.max_weight) * sc.adv_weight
    else:
        weight = torch.zeros((), device=real.device)
    sp.decoder_optimizer.zero_grad(set_to_none=True)
    sp.disc_optimizer.zero_grad(set_to_none=True)
    total = rec + weight * g_loss + d_loss
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"non-finite sharpening loss at sharpen step {step + 1} (rec {rec.item():.4g}, disc {d_loss.item():.4g}, "
            f"adv {g_loss.item():.4g}): lower --sharpen.lr / --sharpen.disc-lr, or use --precision fp32"
        )
    total.backward()
    sp.decoder_optimizer.step()
    sp.disc_optimizer.step()
    with torch.no_grad():
        sharp = mean_gradient(to_uint8(fakes[b:].detach())) / max(mean_gradient(to_uint8(real)), 1e-6)
    return {"rec": rec.item(), "disc": d_loss.item(), "adv": g_loss.item(), "weight": float(weight),
            "prior_sharpness": float(sharp)}  # fmt: skip


def _metrics(state: TrainState, step_m: dict[str, float]) -> dict[str, Any]:
    """The flat metrics Ray Train keeps with a phase-3 checkpoint."""
    return {"epoch": state.epoch, "global_step": state.global_step, "val_loss": state.val_loss,
            "prior_epoch": state.prior_epoch, "prior_step": state.prior_step, "sharpen_step": state.sharpen_step,
            **{f"sharpen/{k}": float(v) for k, v in step_m.items()}}  # fmt: skip

