"""Training job on Ray Train: the joint model with DDP, checkpoints, resume, early stopping, W&B.

Driver side (`run_training`): check the inputs, build the tokenizer from the training captions,
read the train/val datasets (Ray Data, decoded once and cached in the object store), run
`TorchTrainer(train_loop_per_worker)` and export the final model as a self-contained checkpoint
(model/checkpoint.py format) to `<storage_path>/<name>/export`.

Worker side (`train_loop_per_worker`), two phases in one job:
1. Autoencoder: DDP over the workers' shards of the train set, AdamW with linear warmup then
   cosine decay, gradient clipping, bf16 autocast on CUDA; validation every epoch (each worker
   scores its val shard, the sums are all-reduced); early stopping on val loss; a checkpoint
   every `checkpoint_every` epochs through `ray.train.report`, the best kept by val loss.
2. Latent prior, distributed: every worker encodes its own train shard into posterior means,
   the means are all-gathered (N x z_dim floats: small), the standardization stats are fitted
   on all of them, then each step every worker takes its slice of one shared global batch and
   the prior's gradients are all-reduced (data parallel like DDP; the prior is a separate small
   MLP, so plain all_reduce on its gradients is simpler than a second DDP wrapper). It starts
   from the best autoencoder weights reported so far, and ends with a final report whose
   checkpoint is the one exported. Phase 2 is short and not checkpointed midway: a failure
   in it restarts it from the last phase-1 checkpoint.

Checkpoint directory (pickle-free):
    model/                  save_checkpoint(...) output: weights, config, tokenizer (exportable)
    optimizer.safetensors   AdamW state tensors, keyed "<param index>.<name>"
    train_state.json        TrainState, scheduler state, optimizer param groups and scalars

Resume: Ray Train V2 hands the latest checkpoint of `<storage_path>/<name>` to the workers,
both after a worker failure (FailureConfig.max_failures) and when the same command is run
again. The tokenizer is saved once per run (`<run>/tokenizer.json`) and reused on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import psutil
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig, get_preset
from model.networks import JointModel
from model.sampling import caption as caption_images
from model.sampling import generate, illustrate
from model.tokenizer import CaptionTokenizer
from pipeline import storage
from pipeline.data.ingest import read_captions, read_dataset
from pipeline.training.metrics_log import RunLogger, WandbMode, wandb_dir, wandb_run_id

Precision = Literal["auto", "bf16", "fp32"]


class TrainError(RuntimeError):
    """A training input or resource problem, reported before any training starts."""


@dataclass
class TrainConfig:
    """Everything the training job needs. YAML files in configs/ set these fields by name."""

    # -- data ---------------------------------------------------------------------------------
    # Dataset URI (local or s3://): an image folder with metadata.jsonl or Parquet, see pipeline/data.py.
    data: str = "data/engravings"
    # Cap on training rows (None = all): smoke tests and throughput measurements.
    max_train_samples: int | None = None
    # Cap on validation rows (None = all, ~10% of the data by pipeline.data.split_of).
    max_val_samples: int | None = None
    # Decode the images once and keep them in the object store (20K x 128 px ~ 1.3 GB). Set it
    # off for datasets larger than the object store: they then stream from storage each epoch.
    cache_data: bool = True

    # -- model --------------------------------------------------------------------------------
    # Model size preset (model.config.PRESETS): tiny (tests), base (embedded default), large.
    preset: str = "base"
    # Override of the preset's image size (power of two); channel stages are added/removed.
    image_size: int | None = None
    # Overrides of ModelConfig.loss_weights, e.g. {"kl": 0.002}; unknown names are an error.
    loss_weights: dict[str, float] = field(default_factory=dict)
    # An exported checkpoint (local or s3://) whose weights and tokenizer start a *new* run:
    # fine-tuning or training on. Its model config must equal this run's (same preset, image
    # size, loss weights); the latent prior is refitted in phase 2.
    init_from: str | None = None

    # -- optimization (phase 1: autoencoder) --------------------------------------------------
    # Passes over the training set; early stopping may end sooner.
    epochs: int = 20
    # Per worker: the global batch is batch_size x num_workers.
    batch_size: int = 32
    # Peak AdamW learning rate, reached after the warmup.
    lr: float = 1e-3
    # Decoupled weight decay (AdamW); small: the model is not overparameterized for its data.
    weight_decay: float = 0.01
    # Linear warmup steps from 0 to lr: avoids early blow-ups of the KL and contrastive terms.
    warmup_steps: int = 200
    # The cosine decay ends at lr x min_lr_ratio, not 0: the last epochs still learn.
    min_lr_ratio: float = 0.05
    # Gradient norm clip: the InfoNCE term spikes when a batch has many identical captions.
    grad_clip: float = 1.0
    # Early stopping: stop after this many epochs without a val-loss improvement (0 = never).
    patience: int = 4
    # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" forces it on CPU too (AMX hosts).
    precision: Precision = "auto"

    # -- optimization (phase 2: latent prior) -------------------------------------------------
    # Passes of the prior over the training set's posterior means (cheap: an MLP on z).
    prior_epochs: int = 100
    # Global prior batch (split over the workers): large batches suit a diffusion loss.
    prior_batch_size: int = 256
    # Peak prior learning rate (cosine decay to 0 over the prior phase).
    prior_lr: float = 1e-3

    # -- scale --------------------------------------------------------------------------------
    # Ray Train workers, one DDP rank each.
    num_workers: int = 1
    # One GPU per worker when True (NCCL backend); CPU + gloo otherwise.
    use_gpu: bool = False
    # CPUs reserved per worker. On small hosts leave CPUs free for Ray Data.
    cpus_per_worker: float = 1.0
    # torch intra-op threads per worker (0 = torch's default, which Ray sets from the CPUs reserved).
    torch_threads: int = 0
    # Compare the resources asked for with ray.cluster_resources() before starting. Turn it off
    # on autoscaling clusters, where the nodes that will run training may not be up yet.
    check_resources: bool = True

    # -- run, checkpoints, failures -----------------------------------------------------------
    # Where Ray Train keeps runs (local folder or s3://); the run lives in <storage_path>/<name>.
    # A multi-node cluster needs storage every node reaches (s3://, or a shared mount).
    storage_path: str = "runs"
    # Run name: the same name and storage path resume the run instead of starting over.
    name: str = "inkseed-base"
    # Seeds the model init and the per-epoch randomness (data order, posterior sampling).
    seed: int = 0
    # Report a checkpoint every N epochs (the last epoch of phase 1 is always checkpointed).
    checkpoint_every: int = 1
    # Checkpoints kept, best by val loss (the latest one is always kept too).
    num_to_keep: int = 2
    # Worker failures Ray Train recovers from (restarting from the latest checkpoint).
    max_failures: int = 2
    # Testing only: every worker raises after this epoch's report, on the first attempt only.
    fail_after_epoch: int | None = None

    # -- metrics ------------------------------------------------------------------------------
    # W&B project; "auto" mode is online with WANDB_API_KEY set, offline otherwise.
    wandb_project: str = "inkseed"
    wandb_mode: WandbMode = "auto"
    # Step-level metrics every N optimizer steps (epoch-level ones every epoch).
    log_every: int = 50
    # Seeds (and validation pairs) in the per-epoch W&B samples table; 0 disables it.
    log_samples: int = 4

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "num_workers", "checkpoint_every", "num_to_keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prior_epochs", "prior_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.prior_lr <= 0:
            raise ValueError("TrainConfig.lr and prior_lr must be > 0")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"TrainConfig.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"TrainConfig.wandb_mode must be auto/online/offline/disabled, got {self.wandb_mode!r}")
        if not self.name or "/" in self.name:
            raise ValueError(f"TrainConfig.name must be a non-empty folder name, got {self.name!r}")
        self.loss_weights = {k: float(v) for k, v in dict(self.loss_weights).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def load_train_config(path: str) -> TrainConfig:
    """A TrainConfig from a YAML file of field names (unknown names are an error)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config {path!r} does not exist")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(d).__name__}")
    return TrainConfig.from_dict(d)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset with the image-size and loss-weight overrides applied."""
    mc = get_preset(cfg.preset)
    changes: dict[str, Any] = {}
    if cfg.image_size and cfg.image_size != mc.image_size:
        s = cfg.image_size
        if s < 8 or s & (s - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {s}")
        stages = int(round(math.log2(s / 4))) + 1
        ch = list(mc.channels[:stages])
        while len(ch) < stages:  # a larger image: one more stage at half the channels
            ch.append(max(8, ch[-1] // 2))
        changes.update(image_size=s, channels=tuple(ch))
    if cfg.loss_weights:
        changes["loss_weights"] = {**mc.loss_weights, **cfg.loss_weights}
    return mc.replace(**changes) if changes else mc


# ============================================================================ driver side
def run_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name)


def check_inputs(cfg: TrainConfig) -> None:
    """Clear errors for a missing data URI and an unwritable storage path."""
    if not cfg.data:
        raise TrainError("no data URI given (TrainConfig.data / --data)")
    if not storage.exists(cfg.data):
        raise TrainError(f"data URI {cfg.data!r} does not exist (make one with `python -m jobs.prepare_data`)")
    if storage.is_dir(cfg.data):
        fs, path = storage.filesystem(cfg.data)
        if not fs.get_file_info(pafs.FileSelector(path)):
            raise TrainError(f"data URI {cfg.data!r} is an empty folder")
    try:
        storage.check_writable(cfg.storage_path)
    except storage.StorageError as e:
        raise TrainError(f"storage path: {e}") from e


def check_resources(cfg: TrainConfig) -> None:
    """Fail fast when the cluster cannot fit the workers (Ray would wait for them forever)."""
    have = ray.cluster_resources()
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers if cfg.use_gpu else 0}
    for res, amount in need.items():
        if amount > have.get(res, 0):
            raise TrainError(
                f"asked for {amount:g} {res} ({cfg.num_workers} workers x "
                f"{cfg.cpus_per_worker if res == 'CPU' else 1:g}) but the Ray cluster has "
                f"{have.get(res, 0):g}; lower --num-workers / cpus_per_worker, or set "
                "check_resources: false on an autoscaling cluster"
            )


def run_tokenizer(cfg: TrainConfig) -> CaptionTokenizer:
    """The run's tokenizer: trained on the training captions on the first attempt and saved
    in the run folder, reloaded from there on resume (so ids never shift under a checkpoint)."""
    uri = storage.join(run_dir(cfg), "tokenizer.json")
    if storage.exists(uri):
        return CaptionTokenizer.from_json(storage.read_bytes(uri).decode())
    if cfg.init_from:  # the weights' token ids
        tokenizer = CaptionTokenizer.from_json(storage.read_bytes(storage.join(cfg.init_from, "tokenizer.json")).decode())
        storage.write_bytes(uri, tokenizer.to_json().encode())
        return tokenizer
    captions = read_captions(cfg.data, split="train")
    if not captions:
        raise TrainError(f"data URI {cfg.data!r} has no training captions")
    tokenizer = CaptionTokenizer.train(captions)
    storage.write_bytes(uri, tokenizer.to_json().encode())
    return tokenizer


def build_datasets(
    cfg: TrainConfig, tokenizer: CaptionTokenizer, mc: ModelConfig
) -> tuple[dict[str, ray.data.Dataset], dict[str, int], dict[str, list]]:
    """Train/val datasets reduced to the `image` and `tokens` columns, their row counts, and
    a few validation (image uint8, caption) pairs for the per-epoch samples table."""
    datasets, counts = {}, {}
    preview: dict[str, list] = {"images": [], "captions": []}
    for split, cap in (("train", cfg.max_train_samples), ("val", cfg.max_val_samples)):
        ds = read_dataset(
            cfg.data, image_size=mc.image_size, split=split, tokenizer=tokenizer,
            max_caption_tokens=mc.max_caption_tokens,
        )
        if split == "val" and cfg.log_samples:
            rows = ds.take(cfg.log_samples)
            preview["images"] = [np.clip((r["image"] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8) for r in rows]
            preview["captions"] = [r["caption"] for r in rows]
        ds = ds.select_columns(["image", "tokens"])
        if cap:
            ds = ds.limit(cap)
        if cfg.cache_data:
            ds = ds.materialize()
        datasets[split], counts[split] = ds, ds.count()
    return datasets, counts, preview


def run_training(cfg: TrainConfig) -> str:
    """Train (or resume) the run `<storage_path>/<name>`; returns the exported checkpoint URI."""
    if not ray.is_initialized():
        ray.init()
    if not storage.is_s3(cfg.storage_path):
        # Workers run in Ray's own working directory: a relative path would put the metrics
        # and W&B files there instead of beside the checkpoints.
        cfg = dataclasses.replace(cfg, storage_path=os.path.abspath(cfg.storage_path))
    if cfg.init_from and not storage.is_s3(cfg.init_from):
        cfg = dataclasses.replace(cfg, init_from=os.path.abspath(cfg.init_from))
    check_inputs(cfg)
    export = storage.join(run_dir(cfg), "export")
    latest = latest_checkpoint(cfg)
    if latest is not None and _phase(latest) == "done":  # the run ended: nothing to train
        return export_checkpoint(latest, export)
    if cfg.check_resources:
        check_resources(cfg)
    mc = model_config(cfg)
    if latest is not None:
        check_resumable(latest, mc, run_dir(cfg))
    elif cfg.init_from:
        check_init_from(cfg.init_from, mc)
    tokenizer = run_tokenizer(cfg)
    datasets, counts, preview = build_datasets(cfg, tokenizer, mc)
    steps_per_epoch = counts["train"] // cfg.num_workers // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainError(
            f"{counts['train']} training rows cannot fill one batch of {cfg.batch_size} on each of "
            f"{cfg.num_workers} workers; lower --batch-size or --num-workers"
        )
    fs, path = storage.filesystem(cfg.storage_path)
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "model": mc.to_dict(),
            "tokenizer": tokenizer.to_json(),
            "steps_per_epoch": steps_per_epoch,
            "counts": counts,
            "preview": preview,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    return export_checkpoint(result.checkpoint, export)


def _phase(checkpoint: ray.train.Checkpoint) -> str:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/train_state.json") as f:
        return json.loads(f.read())["state"]["phase"]


def latest_checkpoint(cfg: TrainConfig) -> ray.train.Checkpoint | None:
    """The latest checkpoint this run reported (None for a new run)."""
    if not storage.exists(run_dir(cfg)):
        return None
    fs, path = storage.filesystem(run_dir(cfg))
    try:
        return ray.train.Result.from_path(path, storage_filesystem=fs).checkpoint
    except RuntimeError:  # Ray Train's "no run snapshot here": the run never reported
        return None


def _config_changes(saved: dict[str, Any], mc: ModelConfig) -> list[str]:
    now = json.loads(json.dumps(mc.to_dict()))
    return [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]


def check_resumable(checkpoint: ray.train.Checkpoint, mc: ModelConfig, run: str) -> None:
    """Resuming continues the same model: refuse (before any work) a run whose checkpoint was
    made with another model config (another preset, image size, loss weights, or code defaults)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/model/config.json") as f:
        changed = _config_changes(json.loads(f.read())["model_config"], mc)
    if changed:
        raise TrainError(
            f"run {run} was started with another model config ({'; '.join(changed)}): resume it with "
            "the settings and code it started with, or start a new run with another --name"
        )


def check_init_from(uri: str, mc: ModelConfig) -> None:
    """init_from must be a checkpoint of the same model config (checked before any work)."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not storage.exists(storage.join(uri, name)):
            raise TrainError(f"init_from {uri!r} is not an exported checkpoint: {name} is missing")
    changed = _config_changes(json.loads(storage.read_bytes(storage.join(uri, "config.json")))["model_config"], mc)
    if changed:
        raise TrainError(
            f"init_from {uri!r} has another model config ({'; '.join(changed)}): train with its "
            "preset, image size and loss weights"
        )


def export_checkpoint(checkpoint: ray.train.Checkpoint | None, dest: str) -> str:
    """Copy the final checkpoint's `model/` folder (the self-contained model checkpoint) to
    dest, print and return dest."""
    if checkpoint is None:
        raise TrainError("the run reported no checkpoint to export")
    if _phase(checkpoint) != "done":
        raise TrainError(f"latest checkpoint {checkpoint.path} is not the finished run's")
    src_fs, src = checkpoint.filesystem, checkpoint.path
    dst_fs, dst = storage.filesystem(dest)
    storage.delete_dir(dest)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(f"{src}/model", dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    print(f"exported checkpoint: {dest}")
    return dest


# ============================================================================ worker side
@dataclass
class TrainState:
    """Progress that a checkpoint carries besides the weights (JSON in train_state.json)."""

    epoch: int = 0  # last completed epoch (1-based; 0 = none)
    global_step: int = 0
    best_val_loss: float | None = None
    best_epoch: int = 0
    val_loss: float | None = None  # of the weights now in the model
    bad_epochs: int = 0  # epochs since the last improvement (early stopping)
    stopped_early: bool = False
    phase: Literal["autoencoder", "done"] = "autoencoder"

    def end_epoch(self, epoch: int, val_loss: float, patience: int) -> None:
        self.epoch, self.val_loss = epoch, val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.stopped_early = patience > 0 and self.bad_epochs >= patience

    def epochs_left(self, epochs: int) -> range:
        return range(self.epoch + 1, (self.epoch if self.stopped_early else epochs) + 1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: phase 1 (autoencoder, early stopping, checkpoints), phase 2 (prior)."""
    # 1. Unpack the config; same init on every rank (DDP also broadcasts rank 0's weights).
    cfg = TrainConfig.from_dict(config["train"])
    mc = ModelConfig.from_dict(config["model"])
    tokenizer = CaptionTokenizer.from_json(config["tokenizer"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    torch.manual_seed(cfg.seed)
    model = JointModel(mc, tokenizer.vocab_size)

    # 2. Resume from the latest checkpoint (failure retry or the same run started again).
    resumed = ray.train.get_checkpoint()
    state, opt_state = restore_checkpoint(resumed, model) if resumed else (TrainState(), None)
    if resumed is None and cfg.init_from:  # a new run that starts from an exported checkpoint
        model.load_state_dict(storage.open_checkpoint(cfg.init_from).model.state_dict())
    if state.phase == "done":
        return
    model.prior.requires_grad_(False)  # trained in phase 2; DDP must not wait for its grads
    ddp = ray.train.torch.prepare_model(model)
    total_steps = cfg.epochs * config["steps_per_epoch"]
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    if opt_state:
        load_optimizer_state(optimizer, scheduler, *opt_state)
    parts = CheckpointParts(model, tokenizer, optimizer, scheduler, state, cfg)
    log = make_logger(cfg, config, state.global_step) if rank == 0 else None
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    # 3. Phase 1: autoencoder epochs, with validation, early stopping and checkpoints.
    for epoch in state.epochs_left(cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * world + rank)  # resume replays the same draws
        t0 = time.perf_counter()
        train_m = train_epoch(ddp, optimizer, scheduler, train_shard, cfg, epoch, device, amp, state, log)
        val_m = evaluate(model, val_shard, cfg.batch_size, device, amp)
        state.end_epoch(epoch, val_m["loss_total"], cfg.patience)
        metrics = epoch_metrics(epoch, state, train_m, val_m, time.perf_counter() - t0, device)
        if log:
            log.log(metrics, kind="epoch")
            log_samples(log, model, tokenizer, config["preview"], cfg.log_samples, epoch)
        last = epoch == cfg.epochs or state.stopped_early
        save = last or epoch % cfg.checkpoint_every == 0
        report(_report_metrics(metrics, state), rank, parts if save else None)
        if cfg.fail_after_epoch == epoch and resumed is None:
            raise RuntimeError(f"injected failure after epoch {epoch} (TrainConfig.fail_after_epoch)")

    # 4. Phase 2: the latent prior, from the best autoencoder weights reported so far.
    load_best_weights(model, state)
    prior_m = fit_prior(model, train_shard, cfg, device, amp, rank, world, log, state)
    state.phase = "done"
    final = {"epoch": state.epoch, "global_step": state.global_step, "val_loss": state.val_loss, **prior_m}
    if log:
        log.log(final, kind="prior")
        log_samples(log, model, tokenizer, config["preview"], cfg.log_samples, state.epoch + 1)
        log.finish()
    report(final, rank, parts, dir_name="final")


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
        local_shuffle_buffer_size=8 * cfg.batch_size, local_shuffle_seed=cfg.seed * 1000 + epoch,
    )
    ddp.train()
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = ddp(batch["image"], batch["tokens"])
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


def make_logger(cfg: TrainConfig, config: dict[str, Any], resume_step: int) -> RunLogger:
    return RunLogger(
        run_dir(cfg),
        project=cfg.wandb_project,
        mode=cfg.wandb_mode,
        run_id=wandb_run_id(cfg.storage_path, cfg.name),
        local_dir=wandb_dir(cfg.storage_path, cfg.name),
        resume_step=resume_step,
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


# -- distributed helpers ------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_means(sums: dict[str, torch.Tensor], n: int, device: torch.device) -> dict[str, float]:
    """Sample-weighted means over every worker of per-worker sums (keys sorted: same order
    on every rank)."""
    keys = sorted(sums)
    packed = torch.stack([*(sums[k] for k in keys), torch.tensor(float(n), device=device)])
    if _distributed():
        dist.all_reduce(packed)
    total = max(packed[-1].item(), 1.0)
    return {k: packed[i].item() / total for i, k in enumerate(keys)}


def all_gather_counts(n: int, device: torch.device) -> list[int]:
    """Every worker's count, in rank order."""
    if not _distributed():
        return [n]
    out = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor(n, dtype=torch.long, device=device))
    return [int(t) for t in out]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (n_r, D) tensors of every rank in rank order (n_r may differ)."""
    if not _distributed():
        return x
    counts = all_gather_counts(x.shape[0], x.device)
    padded = torch.zeros((max(counts), x.shape[1]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([t[:c] for t, c in zip(out, counts)])


# -- phase 2 ------------------------------------------------------------------------------
def load_best_weights(model: JointModel, state: TrainState) -> None:
    """Load the reported checkpoint with the lowest val loss when it beats the weights in the
    model (with checkpoint_every > 1 the best epoch may have no checkpoint)."""
    current = state.val_loss if state.val_loss is not None else math.inf
    reported = [r for r in ray.train.get_all_reported_checkpoints() if "val_loss" in r.metrics]
    best = min(reported, key=lambda r: r.metrics["val_loss"], default=None)
    if best is None or best.metrics["val_loss"] >= current:
        return
    with best.checkpoint.as_directory() as d:
        model.load_state_dict(load_checkpoint(os.path.join(d, "model")).model.state_dict())
    state.val_loss = float(best.metrics["val_loss"])


@torch.no_grad()
def posterior_means(
    model: JointModel, shard: ray.data.DataIterator, batch_size: int, device: torch.device, amp: bool
) -> torch.Tensor:
    """Joint posterior means (n, z_dim) of this worker's shard of the training set."""
    model.eval()
    mus = []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mu, _ = model.encode_posterior(batch["image"], batch["tokens"])
        mus.append(mu.float())
    model.train()
    return torch.cat(mus) if mus else torch.zeros((0, model.config.z_dim), device=device)


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
            if _distributed():
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


# -- checkpoints --------------------------------------------------------------------------
@dataclass
class CheckpointParts:
    """What a training checkpoint is written from (the objects are updated in place)."""

    model: JointModel
    tokenizer: CaptionTokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    cfg: TrainConfig

    def write(self, path: str) -> None:
        """The checkpoint directory described in the module docstring."""
        state, cfg = self.state, self.cfg
        extra = {"run": cfg.name, "epoch": state.epoch, "val_loss": state.val_loss,
                 "phase": state.phase, "train_config": cfg.to_dict()}
        save_checkpoint(os.path.join(path, "model"), self.model, self.tokenizer, extra=extra)
        tensors, opt_meta = optimizer_state_tensors(self.optimizer)
        save_file(tensors, os.path.join(path, "optimizer.safetensors"))
        meta = {"state": dataclasses.asdict(state), "scheduler": self.scheduler.state_dict(), "optimizer": opt_meta}
        with open(os.path.join(path, "train_state.json"), "w") as f:
            json.dump(meta, f, indent=2)


def report(metrics: dict[str, Any], rank: int, parts: CheckpointParts | None, dir_name: str | None = None) -> None:
    """ray.train.report on every rank (it is a barrier); with `parts`, rank 0 attaches a
    checkpoint named `dir_name` (default epoch-NNNN) and the other ranks attach none."""
    if parts is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            parts.write(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        name = dir_name or f"epoch-{parts.state.epoch:04d}"
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def restore_checkpoint(
    checkpoint: ray.train.Checkpoint, model: JointModel
) -> tuple[TrainState, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Load the weights into `model`; returns the TrainState and the optimizer/scheduler state."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_checkpoint(os.path.join(d, "model")).model.state_dict())
        with open(os.path.join(d, "train_state.json")) as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(d, "optimizer.safetensors"))
    return TrainState(**meta["state"]), (tensors, meta)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for k, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    state: dict[int, dict[str, Any]] = defaultdict(dict)
    for key, v in [*tensors.items(), *meta["optimizer"]["scalars"].items()]:
        pid, name = key.split(".", 1)
        state[int(pid)][name] = v
    optimizer.load_state_dict({"state": dict(state), "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
