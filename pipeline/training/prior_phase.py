"""Phase 2 of training: the latent prior, fitted data parallel on the training set's posterior means.

Every worker encodes its own train shard into posterior means, the means are all-gathered
(N x z_dim floats: small), the standardization stats are fitted on all of them, then each step
every worker takes its slice of one shared global batch and the prior's gradients are
all-reduced (data parallel like DDP; the prior is a separate small MLP, so plain all_reduce on
its gradients is simpler than a second DDP wrapper). It starts from the best autoencoder weights
reported so far, or from the last ones (`TrainConfig.weights`).

Checkpoints: every `prior_checkpoint_every` prior epochs a checkpoint of phase "prior" holds the
prior so far, its optimizer and scheduler and `prior_epoch` / `prior_step` in train_state.json
(the final one, phase "done", is the worker's). A failure in phase 2 resumes from there: the
latents are encoded again from the same frozen autoencoder, the stats are kept from the
checkpoint, and each epoch's batch order comes from (seed, epoch), so the resumed epochs draw the
orders they would have drawn.
"""

from __future__ import annotations

import math
import time

import numpy as np
import ray.data
import ray.train
import torch
import torch.distributed as dist

from model.checkpoint import CheckpointError
from model.networks import JointModel
from pipeline.training.distributed import all_gather_rows, is_distributed
from pipeline.training.faults import maybe_fail
from pipeline.training.metrics_log import RunLogger
from pipeline.training.state import (
    CheckpointParts,
    Phase,
    Restored,
    TrainState,
    read_checkpoint,
    report,
    uri_of,
)


def load_best_weights(model: JointModel, state: TrainState, rank: int) -> None:
    """Load the reported checkpoint with the lowest val loss when it beats the weights in the
    model (with checkpoint_every > 1 the best epoch may have no checkpoint). A corrupt one is
    passed over for the next best (state.read_checkpoint verifies it)."""
    current = state.val_loss if state.val_loss is not None else math.inf
    reported = [r for r in ray.train.get_all_reported_checkpoints() if "val_loss" in r.metrics]
    for best in sorted(reported, key=lambda r: r.metrics["val_loss"]):
        if best.metrics["val_loss"] >= current:
            return
        try:
            weights = read_checkpoint(best.checkpoint).weights
        except CheckpointError as e:
            if rank == 0:
                print(f"best checkpoint {uri_of(best.checkpoint)} is unusable ({e}); trying the next best", flush=True)
            continue
        model.load_state_dict(weights)
        state.val_loss = float(best.metrics["val_loss"])
        return


@torch.no_grad()
def posterior_means(
    model: JointModel, shard: ray.data.DataIterator, batch_size: int, device: torch.device, amp: bool
) -> torch.Tensor:
    """The prior's training latents (n, z_dim) of this worker's shard: joint posterior means."""
    model.eval()
    mus = []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mus.append(model.posterior(batch["image"], batch["tokens"])[0].float())
    model.train()
    return torch.cat(mus) if mus else torch.zeros((0, model.config.z_dim), device=device)


def prior_step(model: JointModel, batch: torch.Tensor, opt, sched, grad_clip: float, world: int) -> torch.Tensor:
    """One optimizer step of the prior on this rank's latents (B, D), gradients averaged over ranks."""
    params = list(model.prior.parameters())
    loss = model.prior_loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if is_distributed():
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return loss


def report_prior_epoch(parts: CheckpointParts, rank: int, loss: float, failures: dict[str, int], resumed_phase: Phase | None
) -> None:
    """Checkpoint the prior phase after its epoch `parts.state.prior_epoch` (a resume continues
    there); then raise a test's injected failure if this is its epoch (pipeline/training/faults.py)."""
    state, epoch = parts.state, parts.state.prior_epoch
    metrics = {"epoch": state.epoch, "global_step": state.global_step, "val_loss": state.val_loss,
               "prior_epoch": epoch, "prior_step": state.prior_step, "prior/loss": loss}
    report(metrics, rank, parts, dir_name=f"prior-{epoch:04d}")
    maybe_fail(failures, "prior_epoch", epoch, resumed_phase)


def fit_prior(
    model: JointModel,
    shard: ray.data.DataIterator,
    parts: CheckpointParts,
    device: torch.device,
    amp: bool,
    rank: int,
    world: int,
    log: RunLogger | None,
    restored: Restored | None,
    failures: dict[str, int],
) -> dict[str, float]:
    """Fit the latent prior on all training posterior means, data parallel over the workers,
    checkpointing as it goes; resumes a phase-2 checkpoint (`restored` in phase "prior")."""
    cfg, state = parts.cfg, parts.state
    resumed = state.phase == "prior"
    t0 = time.perf_counter()
    latents = all_gather_rows(posterior_means(model, shard, cfg.batch_size, device, amp))  # (N, D)
    if not resumed:  # a resumed phase keeps the checkpoint's stats
        model.fit_latent_stats(latents)
    prior = model.prior
    prior.requires_grad_(True)
    prior.train()
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.prior_lr, weight_decay=0.0)
    per_rank = max(1, min(cfg.prior_batch_size // world, latents.shape[0] // world))
    steps = max(1, latents.shape[0] // (per_rank * world))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.prior_epochs * steps)
    if resumed and restored is not None and restored.prior_optimizer is not None:
        opt.load_state_dict(restored.prior_optimizer)
        sched.load_state_dict(restored.prior_scheduler)
    state.phase, parts.prior_optimizer, parts.prior_scheduler = "prior", opt, sched
    start_epoch = state.prior_epoch
    epoch_losses: list[float] = []
    for epoch in range(state.prior_epoch + 1, cfg.prior_epochs + 1):
        # The epoch's order from (seed, epoch), the same on every rank and after a resume.
        perm = torch.randperm(latents.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        epoch_losses = []
        for i in range(steps):
            start = (i * world + rank) * per_rank
            loss = prior_step(model, latents[perm[start : start + per_rank].to(device)], opt, sched, cfg.grad_clip, world)
            state.prior_step += 1
            epoch_losses.append(loss.item())
            if log and state.prior_step % cfg.log_every == 0:
                log.log({"prior/loss": loss.item(), "prior/step": state.prior_step,
                         "global_step": state.global_step}, kind="prior")
        state.prior_epoch = epoch
        every = cfg.prior_checkpoint_every
        if every and epoch % every == 0 and epoch < cfg.prior_epochs:  # the last one is the final checkpoint
            report_prior_epoch(parts, rank, float(np.mean(epoch_losses)), failures, "prior" if resumed else None)
    prior.requires_grad_(False)
    return {
        "prior/loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,
        "prior/latents": float(latents.shape[0]),
        "prior/steps": float(state.prior_step),
        "prior/time_s": time.perf_counter() - t0,
        "prior/start_epoch": float(start_epoch),  # > 0: this attempt resumed a phase-2 checkpoint
        "prior_epoch": state.prior_epoch,
        "prior_step": state.prior_step,
    }
