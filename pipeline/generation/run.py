"""Mass generation on Ray Data: seeds -> engravings (PNG) + captions + Parquet manifests.

    the Ray Data pipeline (pipeline/generation/sampler.py): seeds -> actors -> manifest columns
      -> driver (here): iter_batches, buffer rows per shard, write manifest/part-<shard>.parquet
         when the shard is complete

The output layout, the shard rule and the manifest schema are in pipeline/generation/manifest.py. A rerun of
the same command skips the shards whose part is done (readable, this run's, complete:
pipeline/generation/verify.py) and regenerates the others (a seed always gives the same caption
and image), so after any interruption every seed ends up in the manifest exactly once. A rerun
whose checkpoint, seeds, shard size or sampling settings differ from OUT/run.json is refused
unless `overwrite`, which deletes the previous run.json, manifest/ and images/ and starts fresh.

One writer at a time: the run holds OUT's lease (pipeline/generation/lease.py) from before Ray
starts to its end, so a second run, or an `overwrite`, refuses while this one is alive. `verify`
checks the output and generates nothing; `repair` regenerates the shards verification finds damaged.

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
from pipeline.generation import errors, manifest, verify
from pipeline.generation.config import GenerateConfig, GenerateError
from pipeline.generation.lease import Lease
from pipeline.generation.manifest import SeedPlan
from pipeline.generation.sampler import build_dataset, resolve_resources


def _say(message: str) -> None:
    print(f"inkseed generate: {message}", flush=True)


class _ShardBuffer:
    """Manifest rows of the shards still being generated (metadata only, a few shards at a time).

    Rows are keyed by seed: a retried Ray task may deliver a row twice, the manifest holds it once.
    """

    def __init__(self, out: str, plan: SeedPlan, model_digest: str, run_id: str, lease: Lease | None = None) -> None:
        self.out, self.plan, self.model_digest, self.run_id = out, plan, model_digest, run_id
        self.lease = lease
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
                if self.lease is not None:
                    self.lease.check(fresh=True)  # a run that lost its lease writes no part
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


def _new_info(cfg: GenerateConfig, plan: SeedPlan, model_digest: str) -> dict[str, Any]:
    return manifest.run_info(
        run_id=uuid.uuid4().hex,
        model_digest=model_digest,
        plan=plan,
        steps=cfg.steps,
        bf16=cfg.bf16,
        config=dataclasses.asdict(cfg),
        versions=_versions(),
    )


def existing_run_id(cfg: GenerateConfig, info: dict[str, Any]) -> str | None:
    """The run_id of OUT's run when this command resumes it (None: a fresh output). Refuses a
    different run, a damaged run.json, and run-less leftovers, naming them; writes nothing."""
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
    return None


def prepare_output(cfg: GenerateConfig, plan: SeedPlan, model_digest: str) -> str:
    """Check OUT is compatible with this run (or clear it on overwrite); write run.json for a fresh
    run. Returns the run_id (a resumed run keeps the one in run.json). Call it holding the lease."""
    info = _new_info(cfg, plan, model_digest)
    if cfg.overwrite:
        manifest.clear(cfg.output)
    run_id = existing_run_id(cfg, info)
    if run_id is not None:
        return run_id
    manifest.write_run(cfg.output, info)
    return info["run_id"]


def _verify_only(cfg: GenerateConfig, plan: SeedPlan, digest: str, own_token: str | None = None) -> dict[str, Any]:
    """--verify: check this command's output, print the report; GenerateError when damaged."""
    if existing_run_id(cfg, _new_info(cfg, plan, digest)) is None:
        raise GenerateError(f"{storage.join(cfg.output, 'run.json')}: no such file: nothing to verify")
    report = verify.verify_output(cfg.output, plan, own_token=own_token)
    print("\n".join(report.lines()), flush=True)
    if not report.ok:
        raise GenerateError(
            f"{cfg.output} failed verification ({report.counts()}; damaged shards "
            f"{report.damaged_shards[:10]}): rerun the same command with --repair"
        )
    return {"output": cfg.output, "run_id": report.run_id, "manifest_rows": report.rows, "verified": True}


def _drop_damaged(cfg: GenerateConfig, plan: SeedPlan, own_token: str) -> None:
    """--repair: delete the parts of the shards verification finds damaged, and parts of shards the
    run does not have, so that the generation below regenerates exactly those shards."""
    report = verify.verify_output(cfg.output, plan, own_token=own_token)
    for line in report.lines()[1:-1]:
        _say(f"repair: {line.strip()}")
    for name in report.extra:
        storage.delete_file(storage.join(cfg.output, "manifest", name))
    for shard in report.damaged_shards:
        storage.delete_file(manifest.part_uri(cfg.output, shard))


def _pending_shards(cfg: GenerateConfig, plan: SeedPlan, run_id: str, digest: str) -> list[int]:
    """Shards without a done part (the others are skipped), each unusable part named; the temp
    files that killed writes left in their folders are removed (the lease makes that safe)."""
    done, unusable = verify.done_shards(cfg.output, plan, run_id, digest)
    for shard, problem in sorted(unusable.items()):
        _say(f"{manifest.part_uri(cfg.output, shard)} is not usable ({problem}): regenerating shard {shard}")
    pending = [s for s in range(plan.num_shards) if s not in done]
    _remove_temp_files(cfg.output, pending)
    return pending


def _remove_temp_files(out: str, shards: list[int]) -> None:
    for folder in [out, storage.join(out, "manifest")] + [
        storage.join(out, "images", manifest.shard_name(s)) for s in shards
    ]:
        storage.remove_temp_files(folder)


def _generate(cfg: GenerateConfig, plan: SeedPlan, pending: list[int], ckpt: tuple, run_id: str, lease: Lease) -> None:
    """Stream the pending shards through the actors; write each part once its shard is complete."""
    files, digest = ckpt
    buffer = _ShardBuffer(cfg.output, plan, digest, run_id, lease)
    dataset = build_dataset(cfg, plan, pending, (files, digest), lease_token=lease.token)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            buffer.add(batch)
    except ray.exceptions.RayError as e:  # an actor's error, as Ray Data's wrapper text
        _remove_temp_files(cfg.output, pending)
        raise errors.from_remote(e) from e
    except BaseException:
        _remove_temp_files(cfg.output, pending)
        raise
    buffer.check_done()


def run_generation(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate every pending seed of the run, then validate the manifest; return the summary.
    With cfg.verify, only check the output; with cfg.repair, regenerate what verification finds."""
    # 1. Every input is checked before Ray starts or anything is written.
    cfg.validate()
    plan = seed_plan(cfg)
    digest, files = read_checkpoint(cfg.checkpoint)
    if cfg.verify:
        return _verify_only(cfg, plan, digest)
    try:
        storage.check_writable(cfg.output)
    except storage.StorageError as e:
        raise GenerateError(str(e)) from e
    # 2. The lease: from here to the end this is the only run writing OUT.
    lease = Lease(cfg.output, cfg.lease_ttl)
    took_over = lease.acquire()
    if took_over:
        _say(f"took over the stale lease of {took_over}")
    try:
        if not cfg.overwrite:  # a different or damaged previous run fails before Ray starts
            existing_run_id(cfg, _new_info(cfg, plan, digest))
        # 3. Join the cluster (or start a local one) to resolve the 'auto' resources.
        if not ray.is_initialized():
            ray.init()
        cfg = resolve_resources(cfg)
        # 4. run.json: refuse a different previous run, or record this one.
        run_id = prepare_output(cfg, plan, digest)
        lease.set_run_id(run_id)
        if cfg.repair:
            _drop_damaged(cfg, plan, lease.token)
        pending = _pending_shards(cfg, plan, run_id, digest)
        # 5. Generate what is missing, then check every seed is in the manifest exactly once.
        start = time.perf_counter()
        if pending:
            _generate(cfg, plan, pending, (files, digest), run_id, lease)
        seconds = time.perf_counter() - start
        lease.check()
        rows = verify.validate(cfg.output, plan, run_id, digest)
        if cfg.repair:
            _verify_only(dataclasses.replace(cfg, repair=False), plan, digest, lease.token)
    finally:
        lease.release()
    return _summary(cfg, plan, pending, seconds, rows, run_id)


def _summary(cfg: GenerateConfig, plan: SeedPlan, pending: list[int], seconds: float, rows: int, run_id: str) -> dict:
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
    _say(
        f"{plan.count} seeds ({generated} generated now) in {seconds:.1f} s, "
        f"{summary['seeds_per_s']} seeds/s -> {cfg.output}; manifest rows: {rows}"
    )
    return summary
