"""Phase 2 of training: the latent prior, fitted data parallel on the training set's posterior means.

Every worker encodes its own train shard into posterior means, the means are all-gathered
(N x z_dim floats: small), the standardization stats are fitted on all of them, then each step
every worker takes its slice of one shared global batch and the prior's gradients are
all-reduced (data parallel like DDP; the prior is a separate small MLP, so plain all_reduce on
its gradients is simpler than a second DDP wrapper). It starts from the best autoencoder weights
reported so far, or from the last ones (`TrainConfig.weights`). Phase 2 is short and not checkpointed midway: a failure in it restarts it from
the last phase-1 checkpoint.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import ray.data
import ray.train
import torch
import torch.distributed as dist

from model.checkpoint import load_checkpoint
from model.networks import JointModel
from pipeline.training.config import TrainConfig
from pipeline.training.distributed import all_gather_rows, is_distributed
from pipeline.training.metrics_log import RunLogger
from pipeline.training.state import MODEL_DIR, TrainState


def load_best_weights(model: JointModel, state: TrainState) -> None:
    """Load the reported checkpoint with the lowest val loss when it beats the weights in the
    model (with checkpoint_every > 1 the best epoch may have no checkpoint)."""
    current = state.val_loss if state.val_loss is not None else math.inf
    reported = [r for r in ray.train.get_all_reported_checkpoints() if "val_loss" in r.metrics]
    best = min(reported, key=lambda r: r.metrics["val_loss"], default=None)
    if best is None or best.metrics["val_loss"] >= current:
        return
    with best.checkpoint.as_directory() as d:
        model.load_state_dict(load_checkpoint(os.path.join(d, MODEL_DIR)).model.state_dict())
    state.val_loss = float(best.metrics["val_loss"])


@torch.no_grad()
def posterior_means(
    model: JointModel, shard: ray.data.DataIterator, batch_size: int, device: torch.device, amp: bool
) -> torch.Tensor:
    """The prior's training latents (n, latent_dim) of this worker's shard: joint posterior
    means of z, then the detail latent's means if the model has one (JointModel.prior_latents)."""
    model.eval()
    mus = []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mus.append(model.prior_latents(batch["image"], batch["tokens"]).float())
    model.train()
    return torch.cat(mus) if mus else torch.zeros((0, model.latent_dim), device=device)


def fit_prior(
    model: JointModel,
    shard: ray.data.DataIterator,
    cfg: TrainConfig,
    device: torch.device,
    amp: bool,
    rank: int,
    world: int,
    log: RunLogger | None,
    state: TrainState,
) -> dict[str, float]:
    """Fit the latent prior on all training posterior means, data parallel over the workers."""
    t0 = time.perf_counter()
    latents = all_gather_rows(posterior_means(model, shard, cfg.batch_size, device, amp))  # (N, D)
    model.fit_latent_stats(latents)
    prior = model.prior
    prior.requires_grad_(True)
    prior.train()
    params = list(prior.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.prior_lr, weight_decay=0.0)
    per_rank = max(1, min(cfg.prior_batch_size // world, latents.shape[0] // world))
    steps = max(1, latents.shape[0] // (per_rank * world))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.prior_epochs * steps)
    order = torch.Generator().manual_seed(cfg.seed)  # the same permutation on every rank
    last_epoch_losses: list[float] = []
    for epoch in range(cfg.prior_epochs):
        perm = torch.randperm(latents.shape[0], generator=order)
        last_epoch_losses = []
        for i in range(steps):
            start = (i * world + rank) * per_rank
            loss = model.prior_loss(latents[perm[start : start + per_rank].to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if is_distributed():
                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            last_epoch_losses.append(loss.item())
            if log and (epoch * steps + i + 1) % cfg.log_every == 0:
                log.log({"prior/loss": loss.item(), "prior/step": epoch * steps + i + 1,
                         "global_step": state.global_step}, kind="prior")
    prior.requires_grad_(False)
    return {
        "prior/loss": float(np.mean(last_epoch_losses)),
        "prior/latents": float(latents.shape[0]),
        "prior/steps": float(cfg.prior_epochs * steps),
        "prior/time_s": time.perf_counter() - t0,
    }
