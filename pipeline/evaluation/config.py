"""`EvaluateConfig`: everything `jobs.evaluate` needs (each field's comment is its `--help`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from model.sampling import Device
from pipeline import storage
from pipeline.data.paths import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.evaluation.freeform import ContrastiveProbeConfig
from pipeline.evaluation.probe import ProbeConfig

Log = Callable[[str], None]
# Below this share of held-out rows with grammar captions / attributes, the grammar metrics are
# skipped: the dataset is not the engraving grammar's, and the numbers would mean nothing.
MIN_SHARE = 0.95


class EvaluateError(ValueError):
    """Bad input to the evaluation, detected before the work starts."""


@dataclass
class EvaluateConfig:
    """Everything `jobs.evaluate` needs."""

    # Checkpoint directory (local or s3://) as written by save_checkpoint / jobs.train.
    checkpoint: str = "checkpoints/default"
    # Dataset URI (image folder with metadata.jsonl, or Parquet; local or s3://): its val split is
    # the held-out real data, its train split trains the probe and is the "copied verbatim" set.
    data: str = "data/engravings"
    # Read image paths outside the dataset's folder (absolute paths, other prefixes or buckets);
    # off, such rows are skipped as bad_path (pipeline/data/paths.py).
    allow_external_paths: bool = False
    # Image files larger than this many bytes are skipped as too_large, unread.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Images of more pixels (width x height) than this are skipped as too_large, undecoded.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Output folder (local or s3://): report.json, contact_sheet.png, contact_sheet.html.
    out: str = "eval"
    # N: seeds seed_start .. seed_start + num_seeds - 1 are generated and measured.
    num_seeds: int = 1000
    # The first seed of that range.
    seed_start: int = 0
    # Seeds per model call; 64 keeps CPU memory small (1,000 seeds at 128 px are only 16 MB).
    batch_size: int = 64
    # Where the model runs; "auto" = CUDA when available.
    device: Device = "auto"
    # bf16 autocast for every model call; None = the model's default (on for CUDA, off for CPU).
    # Evaluate both precisions before making bf16 a generation default.
    bf16: bool | None = None
    # DDIM steps of the latent prior; None = the checkpoint's ddim_steps (the quality-vs-steps curve).
    steps: int | None = None
    # Probe cache folder; None = <data>/.probe (or beside a single-file dataset).
    probe_cache: str | None = None
    # How the attribute probe is built and trained (pipeline/evaluation/probe.py); its image_size is
    # replaced by the checkpoint's, so the probe reads images at the size the model makes.
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # How the contrastive probe of the free-form metrics is built and trained
    # (pipeline/evaluation/freeform.py); its image_size is replaced by the checkpoint's too.
    contrastive: ContrastiveProbeConfig = field(default_factory=ContrastiveProbeConfig)
    # K of the retrieval metrics: a pair is coherent when its own caption ranks first among K
    # (its own plus K - 1 others); chance is 1/K.
    retrieval_k: int = 32
    # Held-out pairs used by each conditional mode (caption / illustrate): 500 give +-2% at 90%.
    num_conditional: int = 500
    # Seeds re-generated alone and in a mixed batch for the determinism check.
    determinism_seeds: int = 16
    # Samples on the contact sheet (the first seeds of the range).
    contact_seeds: int = 32

    def validate(self) -> None:
        checks = {
            "num_seeds must be >= 2": self.num_seeds >= 2,
            "steps must be >= 1": self.steps is None or self.steps >= 1,
            "seed_start must be >= 0": self.seed_start >= 0,
            "batch_size must be >= 1": self.batch_size >= 1,
            "probe epochs must be >= 1": self.probe.epochs >= 1,
            "num_conditional must be >= 1": self.num_conditional >= 1,
            "determinism_seeds must be >= 1": self.determinism_seeds >= 1,
            "contact_seeds must be >= 1": self.contact_seeds >= 1,
            "retrieval_k must be >= 2": self.retrieval_k >= 2,
            "max_image_bytes must be >= 1": self.max_image_bytes >= 1,
            "max_image_pixels must be >= 1": self.max_image_pixels >= 1,
            "device must be auto, cpu or cuda": self.device in ("auto", "cpu", "cuda"),
        }
        for message, ok in checks.items():
            if not ok:
                raise EvaluateError(message)
        if not storage.exists(self.data):
            raise EvaluateError(f"dataset {self.data!r} does not exist")
