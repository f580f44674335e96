"""`GenerateConfig`: everything `jobs.generate` needs (each field's comment is its `--help`)."""

from __future__ import annotations

from dataclasses import dataclass

from model.sampling import Compile, Device
from pipeline.generation.manifest import FORMATS, Format


class GenerateError(ValueError):
    """Bad input, or a checkpoint, output or cluster this run cannot use (named in the message)."""


@dataclass
class GenerateConfig:
    """Everything `jobs.generate` needs; defaults fit a laptop run of the embedded checkpoint."""

    # Checkpoint directory (local or s3://) as written by save_checkpoint / jobs.train.
    checkpoint: str = "checkpoints/default"
    # Output root, local or s3://bucket/prefix: run.json, manifest/, images/ or shards/, stats.json
    # (pipeline/generation/manifest.py).
    output: str = "outputs/generate"
    # Where the PNGs go: files = OUT/images/<shard>/<seed>.png (one object per seed); webdataset =
    # OUT/shards/<shard>.tar (PNG, caption, row per seed); parquet = inside the manifest parts
    # (Hugging Face Image column). Part of the run's identity. webdataset and parquet hold each
    # shard's images in the driver's memory until the shard is complete: size --shard-size to that.
    format: Format = "files"
    # The seed range seed_start .. seed_start + num_seeds - 1 (int64, >= 0) ...
    seed_start: int = 0
    # How many seeds the range holds (None: give --seeds-file instead).
    num_seeds: int | None = None
    # ... or a text file of seeds, one per line (local or s3://); exclusive with num_seeds.
    seeds_file: str | None = None
    # Seeds per model call: 64 suits a CPU actor; raise it on GPUs (hundreds per H100).
    batch_size: int = 64
    # Actor pool bounds; max_actors None = one actor per GPU-slot of the cluster, 1 on CPU clusters.
    min_actors: int = 1
    # Upper bound of the actor pool (None = one per GPU slot, 1 on CPU clusters).
    max_actors: int | None = None
    # GPUs per actor; None = 1 when the cluster has GPUs, else 0 (CPU).
    num_gpus: float | None = None
    # CPUs per actor: fractional so the actors never take every CPU and starve Ray Data's read
    # tasks (on a 2-core node a whole-CPU pool hangs the job). Its torch threads are
    # torch_threads', not this number's.
    num_cpus: float = 0.5
    # Seeds per shard = per manifest part file: thousands of rows per file, and the unit of resume.
    shard_size: int = 10_000
    # Where actors run the model; "auto" = CUDA when the actor has a GPU.
    device: Device = "auto"
    # bf16 autocast; None = the model's default (on for CUDA, off for CPU). Changes pixels slightly.
    bf16: bool | None = None
    # DDIM steps of the latent prior; None = the checkpoint's ddim_steps. Changes the samples.
    steps: int | None = None
    # torch.compile (inductor) the image decoder and the prior's denoiser in each actor: "off",
    # "default", "reduce-overhead" (adds CUDA graphs on CUDA), "max-autotune". Compiling happens
    # once per actor before its first batch (its seconds are in stats.json's actor_compile); fused
    # kernels may move a pixel by 1/255, so the mode is part of the run identity.
    compile: Compile = "off"
    # Discard an existing output (run.json, manifest/, images/, shards/, stats.json, the contact
    # sheet) and start fresh. Refused while another run holds the output's lease.
    overwrite: bool = False
    # Generate nothing: check this command's output (every part's schema, run_id, digest and seeds,
    # every image's existence and sha256, in parallel on Ray), print the report, fail if damaged.
    verify: bool = False
    # Verify, regenerate the damaged and missing shards, then verify again.
    repair: bool = False
    # Seconds without a heartbeat after which a run's lease on the output counts as abandoned and
    # the next run takes it over (at once when the holder ran on this host and has exited).
    lease_ttl: float = 60.0
    # Threads per actor that encode PNGs and write them: S3 PUT latency is what they hide.
    io_threads: int = 8
    # torch intra-op threads per CPU actor; None = the node's CPUs divided by max_actors (at least
    # 1: right for one CPU node; on several CPU nodes give it). Ray would set them from the
    # fractional num_cpus (0.5 -> 1 thread), idling half a node.
    torch_threads: int | None = None

    def validate(self) -> None:
        """Raise GenerateError naming the first bad setting."""
        if (self.num_seeds is None) == (self.seeds_file is None):
            raise GenerateError("give exactly one of num_seeds (with seed_start) and seeds_file")
        range_only_start = self.seeds_file is None or self.seed_start == 0
        checks = {
            "seed_start applies to a seed range, not to a seeds file": range_only_start,
            "batch_size must be >= 1": self.batch_size >= 1,
            "shard_size must be >= 1": self.shard_size >= 1,
            "min_actors must be >= 1": self.min_actors >= 1,
            "max_actors must be >= min_actors": self.max_actors is None or self.max_actors >= self.min_actors,
            "num_gpus must be >= 0": self.num_gpus is None or self.num_gpus >= 0,
            "num_cpus must be > 0": self.num_cpus > 0,
            "steps must be >= 1": self.steps is None or self.steps >= 1,
            "io_threads must be >= 1": self.io_threads >= 1,
            "torch_threads must be >= 1": self.torch_threads is None or self.torch_threads >= 1,
            "device must be auto, cpu or cuda": self.device in ("auto", "cpu", "cuda"),
            f"format must be one of {', '.join(FORMATS)}": self.format in FORMATS,
            "lease_ttl must be >= 1 second": self.lease_ttl >= 1,
            "give at most one of --verify, --repair and --overwrite": self.verify + self.repair + self.overwrite <= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise GenerateError(message)
