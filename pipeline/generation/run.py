"""Mass generation on Ray Data: seeds -> engravings (PNG) + captions + Parquet manifests.

    ray.data.range(slots of the pending shards)
      -> map_batches(_assign_seeds)                   slot -> (seed, shard), from the row alone
      -> map_batches(SampleBatch, ActorPoolStrategy)  generate, write PNGs, return manifest columns
      -> driver: iter_batches, buffer rows per shard, write manifest/part-<shard>.parquet when complete

The output layout, the shard rule and the manifest schema are in pipeline/manifest.py. A rerun of
the same command skips the shards that have a manifest part and regenerates the others (a seed
always gives the same caption and image), so after any interruption every seed ends up in the
manifest exactly once. A rerun whose checkpoint, seeds, shard size or sampling settings differ
from OUT/run.json is refused unless `overwrite`, which deletes the previous run.json, manifest/
and images/ and starts a fresh run.

The checkpoint is read once by the driver (local path or s3://) and shipped to the actors through
the object store, so workers on other nodes need neither the driver's disk nor the working dir.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import io
import math
import platform
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from PIL import Image

from model.checkpoint import FILES, CheckpointError, load_checkpoint_files
from pipeline import storage
from pipeline.generation import manifest
from pipeline.generation.manifest import SeedPlan

# Ray Data blocks of this many model batches: big enough that per-task overhead is small next to
# sampling, small enough that several actors share a few-hundred-seed run.
BATCHES_PER_BLOCK = 4


class GenerateError(ValueError):
    """Bad input, or a checkpoint, output or cluster this run cannot use (named in the message)."""


@dataclass
class GenerateConfig:
    """Everything `jobs.generate` needs; defaults fit a laptop run of the embedded checkpoint."""

    # Checkpoint directory (local or s3://) as written by save_checkpoint / jobs.train.
    checkpoint: str = "checkpoints/default"
    # Output root, local or s3://bucket/prefix: run.json, images/, manifest/ (pipeline/manifest.py).
    output: str = "outputs/generate"
    # The seed range seed_start .. seed_start + num_seeds - 1 (int64, >= 0) ...
    seed_start: int = 0
    num_seeds: int | None = None
    # ... or a text file of seeds, one per line (local or s3://); exclusive with num_seeds.
    seeds_file: str | None = None
    # Seeds per model call: 64 suits a CPU actor; raise it on GPUs (hundreds per H100).
    batch_size: int = 64
    # Actor pool bounds; max_actors None = one actor per GPU-slot of the cluster, 1 on CPU clusters.
    min_actors: int = 1
    max_actors: int | None = None
    # GPUs per actor; None = 1 when the cluster has GPUs, else 0 (CPU).
    num_gpus: float | None = None
    # CPUs per actor: fractional so the actors never take every CPU and starve Ray Data's read
    # tasks (on a 2-core node a whole-CPU pool hangs the job). Ray also sets the actor's
    # OMP_NUM_THREADS (torch threads) from it, at least 1.
    num_cpus: float = 0.5
    # Seeds per shard = per manifest part file: thousands of rows per file, and the unit of resume.
    shard_size: int = 10_000
    # Where actors run the model; "auto" = CUDA when the actor has a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast; None = the model's default (on for CUDA, off for CPU). Changes pixels slightly.
    bf16: bool | None = None
    # DDIM steps of the latent prior; None = the checkpoint's ddim_steps. Changes the samples.
    steps: int | None = None
    # Discard an existing output (run.json, manifest/, images/) and start fresh.
    overwrite: bool = False
    # Threads per actor that encode PNGs and write them: S3 PUT latency is what they hide.
    io_threads: int = 8

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
            "device must be auto, cpu or cuda": self.device in ("auto", "cpu", "cuda"),
        }
        for message, ok in checks.items():
            if not ok:
                raise GenerateError(message)


# -- the Ray Data stages ---------------------------------------------------------------------------
def _assign_seeds(batch: dict[str, np.ndarray], plan: SeedPlan, pending: np.ndarray) -> dict[str, np.ndarray]:
    """Slots of the pending shards -> (seed, shard). Slot i is position i % shard_size of pending
    shard i // shard_size; slots past the last seed (a short last shard) are dropped."""
    slot = batch["id"].astype(np.int64)  # (R,)
    shard = pending[slot // plan.shard_size]
    position = shard * plan.shard_size + slot % plan.shard_size
    keep = position < plan.count
    return {"seed": plan.seeds_at(position[keep]), "shard": shard[keep].astype(np.int32)}


class SampleBatch:
    """Ray Data callable class: a batch of seeds -> PNGs under OUT/images + manifest columns.

    Loads the checkpoint once per actor. The actor runs two calls at once (see `build_dataset`):
    the model is behind a lock, so one call samples while the other encodes and writes its PNGs.
    """

    def __init__(
        self,
        checkpoint_files: dict[str, bytes],
        digest: str,
        output: str,
        *,
        device: Literal["auto", "cpu", "cuda"],
        bf16: bool | None,
        steps: int | None,
        io_threads: int,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise GenerateError("device 'cuda' requested but this actor has no GPU (give num_gpus >= 1)")
        self.ink = load_checkpoint_files(checkpoint_files, device)
        if self.ink.digest != digest:
            raise GenerateError(f"checkpoint digest changed in transit: {self.ink.digest} != {digest}")
        self.bf16, self.steps = bf16, steps
        self.fs, self.root = storage.filesystem(output)
        self.is_s3 = storage.is_s3(output)
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="png-io")
        self.model_lock = threading.Lock()
        self.dirs_lock = threading.Lock()
        self.dirs_made: set[str] = set()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, shards = batch["seed"], batch["shard"]  # (B,) int64, (B,) int32
        with self.model_lock, torch.inference_mode():
            samples = self.ink.generate(seeds.tolist(), steps=self.steps, autocast=self.bf16)
        created = np.datetime64(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), "us")
        paths = [manifest.image_path(int(sh), int(s)) for sh, s in zip(shards, seeds)]
        # The row is returned only after its PNG is written: a manifest row implies its image.
        sha = list(self.pool.map(self._write_png, samples.images, paths))
        n, (h, w) = len(seeds), samples.images.shape[1:]  # images (B, H, W) uint8
        return {
            "seed": seeds,
            "shard": shards,
            "caption": np.asarray(samples.captions, dtype=object),
            "image_path": np.asarray(paths, dtype=object),
            "image_sha256": np.asarray(sha, dtype=object),
            "width": np.full(n, w, np.int32),
            "height": np.full(n, h, np.int32),
            "alignment": np.asarray(samples.alignment, np.float32),
            "created_at": np.full(n, created),
        }

    def _write_png(self, image: np.ndarray, rel_path: str) -> str:
        """Encode one (H, W) uint8 image as PNG, write it under the root, return its sha256."""
        buf = io.BytesIO()
        Image.fromarray(image, mode="L").save(buf, format="PNG")
        data = buf.getvalue()
        path = f"{self.root}/{rel_path}"
        parent = path.rsplit("/", 1)[0]
        with self.dirs_lock:
            if parent not in self.dirs_made:
                self.fs.create_dir(parent, recursive=True)
                self.dirs_made.add(parent)
        # Locally write a temp file then rename (an S3 PUT is atomic by itself): an actor of a killed
        # run that is still writing can then never leave a truncated PNG behind a rerun's manifest.
        tmp = path if self.is_s3 else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if tmp != path:
            self.fs.move(tmp, path)
        return hashlib.sha256(data).hexdigest()


def build_dataset(
    cfg: GenerateConfig, plan: SeedPlan, pending: list[int], ckpt: tuple[dict[str, bytes], str]
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline over the pending shards (nothing runs until it is iterated).
    cfg's resources must be resolved (`resolve_resources`)."""
    slots = len(pending) * plan.shard_size
    rows_per_block = cfg.batch_size * BATCHES_PER_BLOCK
    ds = ray.data.range(slots, override_num_blocks=max(1, math.ceil(slots / rows_per_block)))
    ds = ds.map_batches(
        _assign_seeds,
        fn_kwargs={"plan": plan, "pending": np.asarray(pending, dtype=np.int64)},
        batch_size=None,
        batch_format="numpy",
    )
    files, digest = ckpt
    return ds.map_batches(
        SampleBatch,
        fn_constructor_args=(files, digest, cfg.output),
        fn_constructor_kwargs={
            "device": cfg.device,
            "bf16": cfg.bf16,
            "steps": cfg.steps,
            "io_threads": cfg.io_threads,
        },
        # Two calls in flight per actor with real threads: the model lock in SampleBatch keeps one
        # sampling at a time, while the other call's PNG writes overlap it.
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.min_actors,
            max_size=cfg.max_actors,
            max_concurrent_calls_per_actor=2,
            enable_true_multi_threading=True,
        ),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_gpus=cfg.num_gpus,
        num_cpus=cfg.num_cpus,
    )


def cluster_gpus() -> float:
    """GPUs the cluster has now, or can autoscale to (an idle cluster.yaml cluster has none up).
    The autoscaler's limits come from a private Ray API (the one Ray Data uses itself), so any
    failure there falls back to the GPUs present now."""
    present = ray.cluster_resources().get("GPU", 0.0)
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001  (private API: absent or changed means "no autoscaler")
        limits = {}
    return max(present, float(limits.get("GPU", 0)))


def resolve_resources(cfg: GenerateConfig) -> GenerateConfig:
    """A copy of cfg with the 'auto' resources (num_gpus, max_actors) fixed on the running cluster:
    one GPU per actor and one actor per GPU when the cluster has (or can add) GPUs, else 1 CPU actor."""
    gpus = cluster_gpus()
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus else 0.0)
    if cfg.device == "cuda" and num_gpus == 0:
        raise GenerateError("device 'cuda' needs GPUs, but the cluster has none (or num_gpus is 0)")
    if num_gpus > gpus:
        raise GenerateError(f"num_gpus={num_gpus} per actor, but the cluster has at most {gpus:g} GPUs")
    max_actors = cfg.max_actors or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    return dataclasses.replace(
        cfg, num_gpus=num_gpus, min_actors=min(cfg.min_actors, max_actors), max_actors=max_actors
    )


# -- the driver ------------------------------------------------------------------------------------
class _ShardBuffer:
    """Manifest rows of the shards still being generated (metadata only, a few shards at a time).

    Rows are keyed by seed: a retried Ray task may deliver a row twice, the manifest holds it once.
    """

    def __init__(self, out: str, plan: SeedPlan, model_digest: str, run_id: str) -> None:
        self.out, self.plan, self.model_digest, self.run_id = out, plan, model_digest, run_id
        self.rows: dict[int, dict[int, tuple]] = defaultdict(dict)
        self.written: set[int] = set()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for row in zip(*(batch[c].tolist() for c in manifest.WORKER_COLUMNS)):  # Python values
            shard = row[1]
            if shard in self.written:
                continue
            rows = self.rows[shard]
            rows[row[0]] = row
            if len(rows) == self.plan.shard_len(shard):
                columns = dict(zip(manifest.WORKER_COLUMNS, map(list, zip(*rows.values()))))
                manifest.write_part(self.out, shard, columns, self.model_digest, self.run_id)
                self.written.add(shard)
                del self.rows[shard]

    def check_done(self) -> None:
        if self.rows:
            partial = {s: len(r) for s, r in sorted(self.rows.items())[:5]}
            raise manifest.ManifestError(f"the pipeline ended with incomplete shards (shard: rows) {partial}")


def seed_plan(cfg: GenerateConfig) -> SeedPlan:
    try:
        if cfg.seeds_file is not None:
            return manifest.file_plan(cfg.seeds_file, cfg.shard_size)
        return manifest.range_plan(cfg.seed_start, cfg.num_seeds or 0, cfg.shard_size)
    except ValueError as e:
        raise GenerateError(str(e)) from e


def read_checkpoint(uri: str) -> tuple[str, dict[str, bytes]]:
    """Load and verify the checkpoint on the driver; return its digest and raw files for the actors."""
    try:
        files = {name: storage.read_bytes(storage.join(uri, name)) for name in FILES}
    except storage.StorageError as e:
        raise GenerateError(
            f"checkpoint {uri!r} not found or incomplete (needs {', '.join(FILES)}): {e}"
        ) from e
    try:
        return load_checkpoint_files(files, "cpu").digest, files
    except CheckpointError as e:
        raise GenerateError(f"checkpoint {uri!r}: {Path(e.file).name}: {e.problem}") from e


def _versions() -> dict[str, str]:
    try:
        inkseed = importlib.metadata.version("inkseed")
    except importlib.metadata.PackageNotFoundError:
        inkseed = "unknown"
    return {
        "inkseed": inkseed,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def prepare_output(cfg: GenerateConfig, plan: SeedPlan, model_digest: str) -> str:
    """Check OUT is compatible with this run (or clear it on overwrite); write run.json for a fresh
    run. Returns the run_id (a resumed run keeps the one in run.json)."""
    info = manifest.run_info(
        run_id=uuid.uuid4().hex,
        model_digest=model_digest,
        plan=plan,
        steps=cfg.steps,
        bf16=cfg.bf16,
        config=dataclasses.asdict(cfg),
        versions=_versions(),
    )
    if cfg.overwrite:
        manifest.clear(cfg.output)
    old = manifest.read_run(cfg.output)
    if old is not None:
        diff = manifest.identity_diff(old, info)
        if diff:
            raise GenerateError(
                f"output {cfg.output} holds a different run ({'; '.join(diff)}). "
                "Pass --overwrite to discard it, or choose another --output."
            )
        return old["run_id"]
    if manifest.has_output(cfg.output):
        raise GenerateError(
            f"output {cfg.output} has manifest/ or images/ but no run.json; pass --overwrite to discard them"
        )
    manifest.write_run(cfg.output, info)
    return info["run_id"]


def run_generation(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate every pending seed of the run, then validate the manifest; return the summary."""
    # 1. Every input is checked before Ray starts or anything is written.
    cfg.validate()
    plan = seed_plan(cfg)
    digest, files = read_checkpoint(cfg.checkpoint)
    try:
        storage.check_writable(cfg.output)
    except storage.StorageError as e:
        raise GenerateError(str(e)) from e
    # 2. Join the cluster (or start a local one) to resolve the 'auto' resources.
    if not ray.is_initialized():
        ray.init()
    cfg = resolve_resources(cfg)
    # 3. run.json: refuse a different previous run, or record this one.
    run_id = prepare_output(cfg, plan, digest)
    done = manifest.completed_shards(cfg.output)
    pending = [s for s in range(plan.num_shards) if s not in done]

    # 4. Stream the pending shards through the actors; write each part once its shard is complete.
    start = time.perf_counter()
    if pending:
        buffer = _ShardBuffer(cfg.output, plan, digest, run_id)
        for batch in build_dataset(cfg, plan, pending, (files, digest)).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            buffer.add(batch)
        buffer.check_done()
    seconds = time.perf_counter() - start
    # 5. Every seed of the run in the manifest exactly once.
    rows = manifest.validate(cfg.output, plan)
    generated = sum(plan.shard_len(s) for s in pending)
    summary = {
        "seeds": plan.count,
        "generated": generated,
        "seconds": round(seconds, 2),
        "seeds_per_s": round(generated / seconds, 2) if seconds > 0 else 0.0,
        "output": cfg.output,
        "manifest_rows": rows,
        "run_id": run_id,
    }
    print(
        f"inkseed generate: {plan.count} seeds ({generated} generated now) in {seconds:.1f} s, "
        f"{summary['seeds_per_s']} seeds/s -> {cfg.output}; manifest rows: {rows}",
        flush=True,
    )
    return summary
