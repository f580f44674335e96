"""Training configuration: `TrainConfig` (one field per knob, each commented with why), YAML
loading and the model config a run trains.

Precedence is flags > YAML file > these defaults: `jobs.train` builds its command line from this
dataclass (each field's comment is its `--help`), and `configs/*.yaml` set fields by name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import yaml

from model.config import ModelConfig, PresetName, from_fields, get_preset
from pipeline import storage
from pipeline.data.paths import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.training.metrics_log import WandbMode

Precision = Literal["auto", "bf16", "fp32"]
# Batches' worth of rows each epoch reshuffles locally, on top of the one global shuffle the driver
# makes before caching the train split: a new mix of batches every epoch.
SHUFFLE_BATCHES = 32


class TrainError(RuntimeError):
    """A training input or resource problem, reported before any training starts."""


@dataclass
class SharpenConfig:
    """Phase 3: only z -> pixels trains, on a PatchGAN hinge term beside the image loss; the
    encoders, caption decoder, contrastive heads and prior stay frozen, so captions and the
    latent a seed lands on do not move (pipeline/training/sharpen_phase.py says why)."""

    # Optimizer steps (0 = no sharpening). Each step decodes a batch_size batch of posterior
    # samples and as many prior samples; raising it on a finished run continues that run.
    steps: int = 0
    # Decoder learning rate (Adam, betas 0.5/0.9 as in VQGAN): small, the decoder is trained.
    lr: float = 1e-4
    # Discriminator learning rate (its own Adam, betas 0.5/0.9).
    disc_lr: float = 2e-4
    # PatchGAN widths (stride-2 4x4 convs); 3 layers see ~1/4 of a 128 px plate per logit.
    disc_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    # Multiplier of VQGAN's adaptive weight |grad rec| / |grad adv| at the decoder's last layer.
    adv_weight: float = 1.5
    # Cap of the adaptive weight: once the reconstruction degrades its gradient grows, and an
    # uncapped weight runs away.
    max_weight: float = 0.1
    # Steps in which only the discriminator learns (the decoder's term is off): it first
    # learns what real plates look like, so its first gradients are not noise.
    warmup_steps: int = 100
    # DiffAugment (brightness, contrast, translation, cutout) on real and fake images before
    # the discriminator: on small real sets it stops the discriminator memorizing them.
    diff_augment: bool = True
    # Latents each worker samples from the frozen prior (DDIM) as fakes: the decoder is then
    # sharpened on what generation decodes, not only on reconstructions.
    prior_bank: int = 4096
    # Report a checkpoint every N steps (the last step always ends in the final checkpoint).
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"sharpen.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prior_bank", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"sharpen.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.disc_lr <= 0 or self.adv_weight < 0 or self.max_weight < 0:
            raise ValueError("sharpen.lr and disc_lr must be > 0, adv_weight and max_weight >= 0")
        self.disc_channels = [int(c) for c in self.disc_channels]
        if not self.disc_channels or min(self.disc_channels) < 1:
            raise ValueError(f"sharpen.disc_channels needs one or more widths >= 1, got {self.disc_channels}")


@dataclass
class TrainConfig:
    """Everything the training job needs. YAML files in configs/ set these fields by name."""

    # -- data ---------------------------------------------------------------------------------

    # Dataset URI (local or s3://): an image folder with metadata.jsonl or Parquet, see pipeline/data/ingest.py.
    data: str = "data/engravings"
    # Cap on training rows (None = all): smoke tests and throughput measurements.
    max_train_samples: int | None = None
    # Cap on validation rows (None = all, ~10% of the data by pipeline.data.sources.split_of).
    max_val_samples: int | None = None
    # Decode the images once and keep them in the object store (20K x 128 px ~ 1.3 GB). Set it
    # off for datasets larger than the object store: they then stream from storage each epoch.
    cache_data: bool = True
    # Read image paths outside the dataset's folder (absolute paths, other prefixes or buckets);
    # off, such rows are skipped as bad_path (pipeline/data/paths.py).
    allow_external_paths: bool = False
    # Image files larger than this many bytes are skipped as too_large, unread.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Images of more pixels (width x height) than this are skipped as too_large, undecoded.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    # -- model --------------------------------------------------------------------------------

    # Model size preset (model.config.PRESETS): tiny (tests), base (embedded default), large.
    preset: PresetName = "base"
    # Override of the preset's image size (power of two); channel stages are added/removed.
    image_size: int | None = None
    # Overrides of other ModelConfig fields by name, e.g. {"z_dim": 96} (YAML may give lists too:
    # decoder_widths: [0, 0, 128, 128, 64, 0]); unknown names are an error listing the known ones.
    model: dict[str, int | float | bool | str | list[int]] = field(default_factory=dict)
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
    # Phase-1 weights the prior is fitted on and the run exports: "best_val" (lowest val loss;
    # right when val drawings come from the training distribution, as the procedural ones do)
    # or "last" (small real sets: a generator should fit its training drawings, and val loss on
    # unseen ones rises while it does, so "best_val" would keep a blurry early epoch).
    weights: Literal["best_val", "last"] = "best_val"
    # "auto": bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 on
    # other CPUs, where emulated bf16 is slower than fp32; "bf16" / "fp32" force one.
    precision: Precision = "auto"

    # -- optimization (phase 2: latent prior) -------------------------------------------------

    # Passes of the prior over the training set's posterior means (cheap: an MLP on z).
    prior_epochs: int = 100
    # Global prior batch (split over the workers): large batches suit a diffusion loss.
    prior_batch_size: int = 256
    # Peak prior learning rate (cosine decay to 0 over the prior phase).
    prior_lr: float = 1e-3

    # -- phase 3: decoder sharpening (pipeline/training/sharpen_phase.py) ---------------------

    # Decoder-only adversarial fine-tuning after the prior; its fields are `--sharpen.NAME`.
    sharpen: SharpenConfig = field(default_factory=lambda: SharpenConfig())

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
    # Run name, a folder name of letters, digits, ".", "_" and "-" (at most 100): the same name
    # and storage path resume the run instead of starting over.
    name: str = "inkseed-base"
    # Seeds the model init and the per-epoch randomness (data order, posterior sampling).
    seed: int = 0
    # Report a checkpoint every N epochs (the last epoch of phase 1 is always checkpointed).
    checkpoint_every: int = 1
    # Report a checkpoint every N prior epochs in phase 2 (0 = only the final one), so a failure
    # there resumes the prior's fit instead of redoing it.
    prior_checkpoint_every: int = 25
    # Checkpoints kept, best by val loss (the latest one is always kept too); with 2 or more, a
    # corrupt latest checkpoint falls back to the one before it.
    num_to_keep: int = 2
    # Worker failures Ray Train recovers from (restarting from the latest checkpoint).
    max_failures: int = 2
    # Resume even when the data, batch_size or num_workers differ from the run's start (they are
    # refused otherwise); the LR schedule keeps the total steps it started with.
    allow_changed_setup: bool = False

    # -- metrics ------------------------------------------------------------------------------

    # W&B project; "auto" mode is online with WANDB_API_KEY set, offline otherwise.
    wandb_project: str = "inkseed"
    # W&B mode: auto (online with WANDB_API_KEY, else offline), online, offline, disabled.
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
        for name in ("prior_epochs", "prior_batch_size", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.prior_lr <= 0:
            raise ValueError("TrainConfig.lr and prior_lr must be > 0")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"TrainConfig.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.weights not in ("best_val", "last"):
            raise ValueError(f"TrainConfig.weights must be best_val or last, got {self.weights!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"TrainConfig.wandb_mode must be auto/online/offline/disabled, got {self.wandb_mode!r}")
        check_run_name(self.name)
        if self.prior_checkpoint_every < 0:
            raise ValueError(f"TrainConfig.prior_checkpoint_every must be >= 0, got {self.prior_checkpoint_every}")
        self.loss_weights = {k: float(v) for k, v in dict(self.loss_weights).items()}

    def autocast(self, device: torch.device) -> bool:
        """bf16 autocast on this device: "auto" = on CUDA, and on CPUs with native bf16."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        sharpen = d.get("sharpen")
        if isinstance(sharpen, dict):
            d = {**d, "sharpen": from_fields(SharpenConfig, sharpen)}
        elif sharpen is not None and not isinstance(sharpen, SharpenConfig):
            raise ValueError(f"TrainConfig.sharpen must be a mapping of SharpenConfig fields, got {sharpen!r}")
        return from_fields(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def native_cpu_bf16() -> bool:
    """This CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast trains ~1.5x faster
    there, while on CPUs without it (AVX2 only) it was 11x slower than fp32 (docs/quality.md)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: str) -> None:
    """A run name is one folder under the storage path, the same locally and on S3: letters,
    digits, ".", "_" and "-", at most 100 of them, not "." or "..", not starting with "-" (a flag)."""
    if not name:
        problem = "is empty"
    elif len(name) > 100:
        problem = f"has {len(name)} characters, more than 100"
    elif name in (".", ".."):
        problem = "is not a folder name"
    elif name.startswith("-"):
        problem = "starts with '-'"
    elif not RUN_NAME.fullmatch(name):
        problem = "has characters other than letters, digits, '.', '_' and '-'"
    else:
        return
    raise ValueError(f"--name {name!r} {problem}: choose a plain folder name such as base-v1")


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
    """The preset with the image-size, field and loss-weight overrides applied (in that order)."""
    mc = get_preset(cfg.preset).with_image_size(cfg.image_size or get_preset(cfg.preset).image_size)
    if cfg.model:
        if "loss_weights" in cfg.model:
            raise ValueError("set loss weights with TrainConfig.loss_weights, not inside `model`")
        mc = mc.replace(**cfg.model)
    if cfg.loss_weights:
        mc = mc.replace(loss_weights={**mc.loss_weights, **cfg.loss_weights})
    return mc


def run_dir(cfg: TrainConfig) -> str:
    """The run's folder: <storage_path>/<name>."""
    return storage.join(cfg.storage_path, cfg.name)
