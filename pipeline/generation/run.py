"""Mass generation on Ray Data: seeds -> engravings (PNG) + captions + Parquet manifests.

    the Ray Data pipeline (pipeline/generation/sampler.py): seeds -> actors -> manifest columns
      -> driver (here): iter_batches, buffer rows per shard, write manifest/part-<shard>.parquet
         when the shard is complete

The output layout, the shard rule and the manifest schema are in pipeline/generation/manifest.py. A rerun of
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
import importlib.metadata
import platform
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from model.checkpoint import CheckpointError, load_checkpoint_files, read_checkpoint_files
from pipeline import storage
from pipeline.generation import manifest
from pipeline.generation.config import GenerateConfig, GenerateError
from pipeline.generation.manifest import SeedPlan
from pipeline.generation.sampler import build_dataset, resolve_resources


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
        files = read_checkpoint_files(lambda name: storage.read_bytes(storage.join(uri, name)), uri)
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
