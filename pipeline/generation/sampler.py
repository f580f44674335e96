"""The Ray Data side of generation: seeds from row numbers, and the actor that samples and writes.

    ray.data.range(slots of the pending shards)
      -> map_batches(_assign_seeds)                   slot -> (seed, shard), from the row alone
      -> map_batches(SampleBatch, ActorPoolStrategy)  generate, write PNGs (files format) or return
                                                      their bytes (webdataset, parquet), return
                                                      manifest columns

Seeds and file names derive from the row, never from the worker, so any actor, any batch and
any retry gives the same seed the same output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import ray
import torch

from model.checkpoint import Inkseed, load_checkpoint_files
from model.images import png_bytes
from model.sampling import Compile, Device, Samples, available_cpus, compile_model, resolve_device
from pipeline import storage
from pipeline.generation import lease, manifest
from pipeline.generation.config import GenerateConfig, GenerateError
from pipeline.generation.manifest import SeedPlan

# Columns the actors return beside the manifest's: the batch's model and encode(+write) seconds
# and the actor's compile seconds (its first batch only), spread over its rows. The driver sums
# them for stats.json; they are not stored in the manifest.
TIMING_COLUMNS = ("model_s", "encode_s", "compile_s")

# Ray Data blocks of this many model batches: big enough that per-task overhead is small next to
# sampling, small enough that several actors share a few-hundred-seed run.
BATCHES_PER_BLOCK = 4


def _assign_seeds(batch: dict[str, np.ndarray], plan: SeedPlan, pending: np.ndarray) -> dict[str, np.ndarray]:
    """Slots of the pending shards -> (seed, shard). Slot i is position i % shard_size of pending
    shard i // shard_size; slots past the last seed (a short last shard) are dropped."""
    slot = batch["id"].astype(np.int64)  # (R,)
    shard = pending[slot // plan.shard_size]
    position = shard * plan.shard_size + slot % plan.shard_size
    keep = position < plan.count
    return {"seed": plan.seeds_at(position[keep]), "shard": shard[keep].astype(np.int32)}


def generate_seeds(
    ink: Inkseed,
    seeds: list[int],
    batch_size: int,
    *,
    steps: int | None,
    bf16: bool | None,
    temperature: float = 0.0,
    beams: int = 1,
) -> Samples:
    """The model call behind every manifest row (jobs.sample and jobs.demo make theirs with it too).

    Each call runs a full batch of `batch_size` rows: a short batch is padded with copies of its
    last seed and the copies dropped. CPU kernels pick another reduction order for a handful of
    rows, which moves a few pixels by 1/255; a fixed batch shape keeps a seed's PNG bytes the same
    whatever batch it lands in (a run's last partial batch, one seed alone in the demo).
    temperature / beams: caption decoding (jobs.generate keeps the defaults: greedy).
    """
    pad = [seeds[-1]] * (batch_size - len(seeds)) if seeds else []
    with torch.inference_mode():
        samples = ink.generate(list(seeds) + pad, steps=steps, autocast=bf16, temperature=temperature, beams=beams)
    n = len(seeds)
    samples.images, samples.alignment, samples.z = samples.images[:n], samples.alignment[:n], samples.z[:n]
    samples.captions, samples.seeds = samples.captions[:n], samples.seeds[:n]
    return samples


def encode_png(image: np.ndarray) -> tuple[bytes, str]:
    """One (H, W) uint8 image -> its PNG file bytes and their hex sha256 (the manifest's image_sha256)."""
    data = png_bytes(image)
    return data, hashlib.sha256(data).hexdigest()


class SampleBatch:
    """Ray Data callable class: a batch of seeds -> PNGs + manifest columns.

    Loads the checkpoint once per actor. The actor runs two calls at once (see `build_dataset`):
    the model is behind a lock, so one call samples while the other encodes (and writes) its PNGs.
    In the files format it writes them under OUT/images; in the others it returns their bytes in
    a `png` column, and the driver packs the shard (pipeline/generation/formats.py). With a
    `lease_token`, each batch first checks that its run still holds the output's lease
    (pipeline/generation/lease.py): an actor of a run that lost it writes nothing more.
    """

    def __init__(
        self,
        checkpoint_files: dict[str, bytes],
        digest: str,
        output: str,
        *,
        device: Device,
        batch_size: int,
        bf16: bool | None,
        steps: int | None,
        io_threads: int,
        torch_threads: int | None,
        pool_size: int | None,
        lease_token: str | None = None,
        fmt: str = "files",
        compile: Compile = "off",
    ) -> None:
        try:
            resolved = resolve_device(device)
        except RuntimeError as e:
            raise GenerateError(str(e)) from e
        if resolved.type == "cpu":  # this node's CPUs shared by the pool, not Ray's 1 per 0.5 CPU
            torch.set_num_threads(torch_threads or max(1, available_cpus() // (pool_size or 1)))
        self.ink = load_checkpoint_files(checkpoint_files, resolved)
        if self.ink.digest != digest:
            raise GenerateError(f"checkpoint digest changed in transit: {self.ink.digest} != {digest}")
        self.bf16, self.steps, self.batch_size = bf16, steps, batch_size
        self.output, self.lease_token, self.fmt = output, lease_token, fmt
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="png-io")
        self.compile_s = self._compile(compile) if compile != "off" else 0.0
        self.model_lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds, shards = batch["seed"], batch["shard"]  # (B,) int64, (B,) int32
        with self.model_lock:
            start = time.perf_counter()
            samples = generate_seeds(self.ink, seeds.tolist(), self.batch_size, steps=self.steps, bf16=self.bf16)
            model_s = time.perf_counter() - start
            compile_s, self.compile_s = self.compile_s, 0.0  # counted once per actor
        created = np.datetime64(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), "us")
        paths = [manifest.image_path(int(sh), int(s), self.fmt) for sh, s in zip(shards, seeds)]
        start = time.perf_counter()
        if self.fmt == "files":
            if self.lease_token is not None:
                lease.still_held(self.output, self.lease_token)
            # The row is returned only after its PNG is written: a manifest row implies its image.
            # On a failed write (disk full) every other write of the batch ends first, so none is
            # cut off halfway and leaves a temp file, then the first error is raised.
            futures = [self.pool.submit(self._write_png, img, path) for img, path in zip(samples.images, paths)]
            wait(futures)
            sha, pngs = [f.result() for f in futures], None
        else:  # the driver writes them: nothing here touches the output
            encoded = list(self.pool.map(encode_png, samples.images))
            pngs, sha = [data for data, _ in encoded], [digest for _, digest in encoded]
        n, (h, w) = len(seeds), samples.images.shape[1:]  # images (B, H, W) uint8
        encode_s = time.perf_counter() - start
        timing = {name: np.full(n, s / max(n, 1)) for name, s in
                  (("model_s", model_s), ("encode_s", encode_s), ("compile_s", compile_s))}  # fmt: skip
        return {
            **({} if pngs is None else {"png": np.asarray(pngs, dtype=object)}),
            **timing,
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

    def _compile(self, mode: Compile) -> float:
        """Compile the model (model/sampling.compile_model) and run one batch, which is when
        inductor compiles; returns the seconds it took."""
        start = time.perf_counter()
        compile_model(self.ink.model, mode)
        generate_seeds(self.ink, [0], self.batch_size, steps=self.steps, bf16=self.bf16)
        seconds = time.perf_counter() - start
        print(f"compiled the model ({mode}) in {seconds:.1f} s", flush=True)
        return seconds

    def _write_png(self, image: np.ndarray, rel_path: str) -> str:
        """Encode one (H, W) uint8 image as PNG, write it under the output (atomically: an actor
        of a killed run that is still writing can never leave a truncated PNG behind a rerun's
        manifest), return its sha256."""
        data, sha = encode_png(image)
        storage.write_bytes(storage.join(self.output, rel_path), data)
        return sha

    def __del__(self) -> None:
        if getattr(self, "pool", None) is not None:  # __init__ may have failed before the pool
            self.pool.shutdown(wait=True)


def build_dataset(
    cfg: GenerateConfig,
    plan: SeedPlan,
    pending: list[int],
    ckpt: tuple[dict[str, bytes], str],
    lease_token: str | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline over the pending shards (nothing runs until it is iterated).
    cfg's resources must be resolved (`resolve_resources`); `lease_token` is the run's hold on
    the output's lease, checked by the actors before they write."""
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
            "batch_size": cfg.batch_size,
            "bf16": cfg.bf16,
            "steps": cfg.steps,
            "io_threads": cfg.io_threads,
            "torch_threads": cfg.torch_threads,
            "pool_size": cfg.max_actors,
            "lease_token": lease_token,
            "fmt": cfg.format,
            "compile": cfg.compile,
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
