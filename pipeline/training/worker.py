"""The Ray Train worker: one DDP rank runs phase 1 (the autoencoder), phase 2 (the prior), then
phase 3 (decoder sharpening, when `sharpen.steps` > 0).

Phase 1: DDP over the workers' shards of the train set, AdamW with linear warmup then cosine
decay, gradient clipping, bf16 autocast on CUDA (or when asked); validation every epoch (each
worker scores its val shard, the sums are all-reduced); early stopping on val loss; a checkpoint
every `checkpoint_every` epochs through `ray.train.report`, the best kept by val loss. Rank 0
alone logs (pipeline/training/metrics_log.py). Phase 2 is pipeline/training/prior_phase.py,
phase 3 pipeline/training/sharpen_phase.py (after the prior: it decodes the prior's samples).

Resume: Ray Train V2 hands the latest checkpoint to the workers, both after a worker failure
(FailureConfig.max_failures) and when the same command is run again; a corrupt one falls back
to the newest usable earlier one (pipeline/training/resume.py). The LR schedule keeps the
length it started with (train_state.json's setup), so it continues from its step.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import numpy as np
import psutil
import ray.data
import ray.train
import ray.train.torch
import torch

from model.config import ModelConfig
from model.networks import JointModel
from model.sampling import caption as caption_images
from model.sampling import generate, illustrate
from model.tokenizer import CaptionTokenizer
from pipeline import storage
from pipeline.training.config import SHUFFLE_BATCHES, TrainConfig, run_dir
from pipeline.training.distributed import all_gather_counts, all_reduce_means
from pipeline.training.faults import maybe_fail
from pipeline.training.metrics_log import RunLogger, wandb_dir, wandb_run_id
from pipeline.training.prior_phase import fit_prior, load_best_weights
from pipeline.training.resume import choose
from pipeline.training.sharpen_phase import sharpen_decoder
from pipeline.training.state import CheckpointParts, Restored, TrainState, report


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: phase 1 (autoencoder, early stopping, checkpoints), phase 2 (prior), phase 3
    (decoder sharpening); each checkpointed and resumed mid-phase."""
    # 1. Unpack the config; same init on every rank (DDP also broadcasts rank 0's weights).
    cfg = TrainConfig.from_dict(config["train"])
    tokenizer = CaptionTokenizer.from_json(config["tokenizer"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    amp = cfg.autocast(device)
    # 2. Resume from the latest usable checkpoint, or start (maybe from init_from).
    model, restored = build_model(cfg, config, tokenizer, rank)
    state = restored.state if restored else TrainState()
    if state.finished(cfg):
        return
    resumed_phase = state.phase if restored else None  # which injected failures (faults.py) still fire
    model.prior.requires_grad_(False)  # trained in phase 2; DDP must not wait for its grads
    ddp = ray.train.torch.prepare_model(model)
    optimizer, scheduler = make_optimizer(model, cfg, schedule_steps(state, cfg, config))
    if restored:
        optimizer.load_state_dict(restored.optimizer)
        scheduler.load_state_dict(restored.scheduler)
    parts = CheckpointParts(model, tokenizer, optimizer, scheduler, state, cfg, made_by=config.get("made_by", {}))
    log = make_logger(cfg, config, state) if rank == 0 else None
    shards = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    failures = config.get("fail_after", {})
    try:
        # 3. Phase 1: autoencoder epochs, with validation, early stopping and checkpoints.
        for epoch in state.epochs_left(cfg.epochs):
            torch.manual_seed(cfg.seed * 100_003 + epoch * world + rank)  # resume replays the same draws
            run_epoch(ddp, model, optimizer, scheduler, shards, parts, config, epoch, log)
            maybe_fail(failures, "epoch", epoch, resumed_phase)
            if state.stopped_early:  # patience ran out: on to the prior, from the best weights
                break

        # 4. Phase 2: the latent prior, from the best autoencoder weights reported so far
        #    (or the last ones: TrainConfig.weights); a phase-2 checkpoint resumes it.
        final: dict[str, Any] = {"epoch": state.epoch, "global_step": state.global_step, "val_loss": state.val_loss}
        if state.phase in ("autoencoder", "prior"):
            if cfg.weights == "best_val" and state.phase == "autoencoder":
                load_best_weights(model, state, rank)
            final.update(fit_prior(model, shards[0], parts, device, amp, rank, world, log, restored, failures))
            if log:
                log.log(final, kind="prior")  # the phase's summary row

        # 5. Phase 3: decoder sharpening on the frozen latent (pipeline/training/sharpen_phase.py).
        if state.sharpen_step < cfg.sharpen.steps:
            final.update(sharpen_decoder(model, shards[0], parts, device, amp, log, restored, failures, resumed_phase))
            if log:
                log.log(final, kind="sharpen")
        state.phase = "done"
        final.update(prior_epoch=state.prior_epoch, prior_step=state.prior_step, sharpen_step=state.sharpen_step)
        if log:
            log_samples(log, model, tokenizer, config["preview"], cfg.log_samples, state.epoch + 1)
        report(final, rank, parts, dir_name="final")  # "final-2" when a finished run sharpens on
    finally:
        if log:
            log.finish()


def build_model(
    cfg: TrainConfig, config: dict[str, Any], tokenizer: CaptionTokenizer, rank: int
) -> tuple[JointModel, Restored | None]:
    """The model with the same init on every rank (DDP also broadcasts rank 0's weights), loaded
    from the latest usable checkpoint (a failure retry or the same run started again), or from an
    exported checkpoint when a new run starts from one (init_from)."""
    torch.manual_seed(cfg.seed)
    model = JointModel(ModelConfig.from_dict(config["model"]), tokenizer.vocab_size)
    resumed = ray.train.get_checkpoint()
    restored = choose(resumed, _reported, run_dir(cfg), say=_say if rank == 0 else _quiet) if resumed else None
    if restored:
        model.load_state_dict(restored.weights)
    elif cfg.init_from:
        model.load_state_dict(storage.open_checkpoint(cfg.init_from).model.state_dict())
    return model, restored


def run_epoch(
    ddp: torch.nn.Module,
    model: JointModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    shards: tuple[ray.data.DataIterator, ray.data.DataIterator],
    parts: CheckpointParts,
    config: dict[str, Any],
    epoch: int,
    log: RunLogger | None,
) -> None:
    """One phase-1 epoch on this rank: train, validate, log (rank 0), report (a checkpoint when due)."""
    cfg, state = parts.cfg, parts.state
    rank, device = ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    amp = cfg.autocast(device)
    t0 = time.perf_counter()
    train_m = train_epoch(ddp, optimizer, scheduler, shards[0], cfg, epoch, device, amp, state, log)
    val_m = evaluate(model, shards[1], cfg.batch_size, device, amp)
    state.end_epoch(epoch, val_m["loss_total"], cfg.patience)
    metrics = epoch_metrics(epoch, state, train_m, val_m, time.perf_counter() - t0, device)
    if log:
        log.log(metrics, kind="epoch")
        log_samples(log, model, parts.tokenizer, config["preview"], cfg.log_samples, epoch)
    save = epoch == cfg.epochs or state.stopped_early or epoch % cfg.checkpoint_every == 0
    report(_report_metrics(metrics, state), rank, parts if save else None)


def schedule_steps(state: TrainState, cfg: TrainConfig, config: dict[str, Any]) -> int:
    """The LR schedule's length: the one the run started with (train_state.json's setup), so a
    resume continues the schedule from its step even when the steps per epoch changed; a new run
    (or one checkpointed before the setup was stored) records today's."""
    if not state.setup.get("total_steps"):
        state.setup = {**config["setup"], "steps_per_epoch": config["steps_per_epoch"],
                       "total_steps": cfg.epochs * config["steps_per_epoch"]}  # fmt: skip
    else:  # the run goes on with today's setup (the driver refused a change unless allowed)
        state.setup = {**state.setup, **config["setup"]}
    return state.setup["total_steps"]


def _reported() -> list[tuple[ray.train.Checkpoint, dict[str, Any]]]:
    return [(r.checkpoint, r.metrics) for r in ray.train.get_all_reported_checkpoints()]


def _say(line: str) -> None:
    print(f"(rank 0) {line}", flush=True)


def _quiet(line: str) -> None:
    """Ranks other than 0 make the same choice silently."""


# -- phase 1 helpers ----------------------------------------------------------------------
def make_optimizer(
    model: JointModel, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable (non-prior) parameters; linear warmup then cosine decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_steps, max(1, total_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(
    ddp: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    shard: ray.data.DataIterator,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    amp: bool,
    state: TrainState,
    log: RunLogger | None,
) -> dict[str, Any]:
    """One pass over this worker's shard; returns the epoch means over all workers, the
    throughput and each worker's sample count."""
    params = [p for p in ddp.parameters() if p.requires_grad]
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    batches = shard.iter_torch_batches(
        batch_size=cfg.batch_size, drop_last=True, device=device,
        local_shuffle_buffer_size=SHUFFLE_BATCHES * cfg.batch_size, local_shuffle_seed=cfg.seed * 1000 + epoch,
    )
    ddp.train()
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = ddp(batch["image"], batch["tokens"])
        if not torch.isfinite(out["loss"]):  # stop before a NaN reaches the weights and a checkpoint
            bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
            raise FloatingPointError(
                f"non-finite training loss at step {state.global_step + 1} (epoch {epoch}; non-finite: "
                f"{', '.join(bad)}): lower --lr or --loss-weights, or use --precision fp32"
            )
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        state.global_step += 1
        b = batch["image"].shape[0]
        n += b
        out = {**_named(out), "grad_norm": grad_norm.detach()}
        for k, v in out.items():
            sums[k] += v.detach().float() * b
        if log and state.global_step % cfg.log_every == 0:
            step_m = {f"train/{k}": float(v.detach()) for k, v in out.items()}
            step_m["train/caption_perplexity"] = math.exp(min(20.0, step_m["train/caption_ce"]))
            log.log({**step_m, "train/lr": scheduler.get_last_lr()[0], "global_step": state.global_step}, kind="step")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    means: dict[str, Any] = all_reduce_means(sums, n, device)
    per_worker = all_gather_counts(n, device)
    means.update(
        lr=scheduler.get_last_lr()[0],
        samples=float(sum(per_worker)),
        samples_per_s=sum(per_worker) / max(seconds, 1e-9),
        samples_per_worker=per_worker,
        train_time_s=seconds,
        # This process's CPU time in the pass: CPU time / wall time far below the threads in
        # use means the worker was starved (an oversubscribed host), not that the model is slow.
        train_cpu_s=cpu_seconds,
    )
    return means


@torch.no_grad()
def evaluate(
    model: JointModel, shard: ray.data.DataIterator, batch_size: int, device: torch.device, amp: bool
) -> dict[str, float]:
    """Val metrics (joint posterior, z = mu) over all workers' val shards. Uses the bare
    module, not DDP: no gradient sync is needed and shards may hold unequal batch counts."""
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    n = 0
    model.eval()
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = _named(model(batch["image"], batch["tokens"]))
        b = batch["image"].shape[0]
        n += b
        for k, v in out.items():
            sums[k] += v.float() * b
    model.train()
    return all_reduce_means(sums, n, device)


def _named(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs with `loss` named `loss_total` (the name every log uses)."""
    return {("loss_total" if k == "loss" else k): v for k, v in out.items()}


def epoch_metrics(
    epoch: int,
    state: TrainState,
    train_m: dict[str, float],
    val_m: dict[str, float],
    seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    """The epoch's row: train/val means, perplexities, throughput, time and memory."""
    perf = {
        "perf/samples_per_s": train_m.pop("samples_per_s"),
        "perf/samples": train_m.pop("samples"),
        "perf/samples_per_worker": train_m.pop("samples_per_worker"),
        "perf/train_time_s": train_m.pop("train_time_s"),
        "perf/train_cpu_s": train_m.pop("train_cpu_s"),
        "perf/epoch_time_s": seconds,
        "perf/rss_gb": psutil.Process().memory_info().rss / 1e9,
    }
    if device.type == "cuda":
        perf["perf/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    row: dict[str, Any] = {"epoch": epoch, "global_step": state.global_step, **perf}
    for prefix, m in (("train_epoch", train_m), ("val", val_m)):
        m["caption_perplexity"] = math.exp(min(20.0, m["caption_ce"]))
        row.update({f"{prefix}/{k}": v for k, v in m.items()})
    row.update({"val/best_loss_total": state.best_val_loss, "val/bad_epochs": state.bad_epochs})
    return row


def _report_metrics(row: dict[str, Any], state: TrainState) -> dict[str, Any]:
    """The flat metrics Ray Train keeps with each checkpoint (val_loss scores them)."""
    return {
        "epoch": row["epoch"],
        "global_step": row["global_step"],
        "val_loss": row["val/loss_total"],
        "train_loss": row["train_epoch/loss_total"],
        "val_caption_accuracy": row["val/caption_accuracy"],
        "val_image_mse": row["val/image_mse"],
        "samples_per_s": row["perf/samples_per_s"],
        "stopped_early": state.stopped_early,
    }


def make_logger(cfg: TrainConfig, config: dict[str, Any], state: TrainState) -> RunLogger:
    return RunLogger(
        run_dir(cfg),
        project=cfg.wandb_project,
        mode=cfg.wandb_mode,
        run_id=wandb_run_id(cfg.storage_path, cfg.name),
        local_dir=wandb_dir(cfg.storage_path, cfg.name),
        resume_step=state.global_step,
        resume_prior_step={"autoencoder": 0, "prior": state.prior_step}.get(state.phase, math.inf),
        resume_sharpen_step=state.sharpen_step,
        config={"train": config["train"], "model": config["model"], "counts": config["counts"]},
    )


def log_samples(
    log: RunLogger, model: JointModel, tokenizer: CaptionTokenizer, preview: dict[str, list], n: int, epoch: int
) -> None:
    """Seeds 0..n-1 generated (image, caption, alignment), next to validation pairs captioned
    (image -> caption) and illustrated (caption -> image). Until phase 2 fits the prior, the
    generated column shows the decoders on an unfitted prior; the conditional columns are the
    ones to watch during phase 1."""
    if n == 0:
        return
    seeds = list(range(n))
    samples = generate(model, tokenizer, seeds)
    real, texts = preview["images"], preview["captions"]
    captioned = caption_images(model, tokenizer, np.stack(real)) if real else []
    illustrated = illustrate(model, tokenizer, texts, seeds[: len(texts)]) if texts else []
    rows = []
    for i, seed in enumerate(seeds):
        pair = [real[i], texts[i], captioned[i], illustrated[i]] if i < len(real) else [None] * 4
        rows.append([seed, samples.images[i], samples.captions[i], float(samples.alignment[i]), *pair])
    columns = ["seed", "image", "caption", "alignment", "val_image", "val_caption", "captioned", "illustrated"]
    log.log_samples(epoch, columns, rows)
