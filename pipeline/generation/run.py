"""Mass generation on Ray Data: seeds -> engravings (PNG) + captions + Parquet manifests.

    the Ray Data pipeline (pipeline/generation/sampler.py): seeds -> actors -> manifest columns
      -> driver (here): iter_batches, buffer rows per shard; when the shard is complete, write
         it in the run's format (pipeline/generation/formats.py: the tar, then the part)
      -> at the end: validate the manifest, write OUT/contact_sheet.png and OUT/stats.json

The output layout, the formats, the shard rule and the manifest schema are in
pipeline/generation/manifest.py. A rerun of the same command skips the shards whose part is done
(readable, this run's, complete: pipeline/generation/verify.py) and regenerates the others (a seed
always gives the same caption and image), so after any interruption every seed ends up in the
manifest exactly once. A rerun whose checkpoint, seeds, shard size, format or sampling settings
differ from OUT/run.json is refused unless `overwrite`, which deletes the previous run's files
(manifest.clear) and starts fresh.

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
from pipeline import contact_sheet, storage
from pipeline.generation import errors, formats, manifest, stats, verify
from pipeline.generation.config import GenerateConfig, GenerateError
from pipeline.generation.lease import Lease
from pipeline.generation.manifest import SeedPlan
from pipeline.generation.sampler import TIMING_COLUMNS, build_dataset, resolve_resources


def _say(message: str) -> None:
    print(f"inkseed generate: {message}", flush=True)


class _ShardBuffer:
    """Manifest rows of the shards still being generated, a few shards at a time: metadata only in
    the files format, with each row's PNG bytes in the others.

    Rows are keyed by seed: a retried Ray task may deliver a row twice, the manifest holds it once
    (`duplicates` counts the rows dropped). `seconds` sums the actors' timing columns and the
    driver's own shard writes, for stats.json.
    """

    def __init__(
        self, out: str, plan: SeedPlan, model_digest: str, run_id: str, lease: Lease | None = None, fmt: str = "files"
    ) -> None:
        self.out, self.plan, self.model_digest, self.run_id = out, plan, model_digest, run_id
        self.lease, self.fmt = lease, fmt
        self.columns = manifest.WORKER_COLUMNS + (() if fmt == "files" else ("png",))
        self.rows: dict[int, dict[int, tuple]] = defaultdict(dict)
        self.written: set[int] = set()
        self.duplicates = 0
        self.seconds = dict.fromkeys((*TIMING_COLUMNS, "write"), 0.0)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for name in TIMING_COLUMNS:
            self.seconds[name] += float(batch[name].sum())
        for row in zip(*(batch[c].tolist() for c in self.columns)):  # Python values
            shard = row[1]
            rows = self.rows[shard]
            if shard in self.written or row[0] in rows:
                self.duplicates += 1
                continue
            rows[row[0]] = row
            if len(rows) == self.plan.shard_len(shard):
                if self.lease is not None:
                    self.lease.check(fresh=True)  # a run that lost its lease writes no part
                start = time.perf_counter()
                columns = dict(zip(self.columns, map(list, zip(*rows.values()))))
                formats.write_shard(self.out, self.fmt, shard, columns, self.model_digest, self.run_id)
                self.seconds["write"] += time.perf_counter() - start
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
        fmt=cfg.format,
        compile=cfg.compile,
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
            f"output {cfg.output} has manifest/, images/ or shards/ but no run.json; pass --overwrite to discard them"
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


def _drop_damaged(cfg: GenerateConfig, plan: SeedPlan, own_token: str) -> int:
    """--repair: delete the parts of the shards verification finds damaged, and parts and tars of
    shards the run does not have, so that the generation below regenerates exactly those shards.
    Returns how many shards it will regenerate."""
    report = verify.verify_output(cfg.output, plan, own_token=own_token)
    for line in report.lines()[1:-1]:
        _say(f"repair: {line.strip()}")
    for name in report.extra:
        storage.delete_file(storage.join(cfg.output, "manifest", name))
    for rel in report.extra_tars:
        storage.delete_file(storage.join(cfg.output, rel))
    for shard in report.damaged_shards:
        storage.delete_file(manifest.part_uri(cfg.output, shard))
    return len(report.damaged_shards)


def _pending_shards(cfg: GenerateConfig, plan: SeedPlan, run_id: str, digest: str) -> tuple[list[int], int]:
    """Shards without a done part (the others are skipped), and how many had an unusable one, each
    named; the temp files that killed writes left in their folders are removed (the lease makes
    that safe)."""
    done, unusable = verify.done_shards(cfg.output, plan, run_id, digest, cfg.format)
    for shard, problem in sorted(unusable.items()):
        _say(f"{manifest.part_uri(cfg.output, shard)} is not usable ({problem}): regenerating shard {shard}")
    pending = [s for s in range(plan.num_shards) if s not in done]
    _remove_temp_files(cfg.output, pending)
    return pending, len(unusable)


def _remove_temp_files(out: str, shards: list[int]) -> None:
    for folder in [out, storage.join(out, "manifest"), storage.join(out, "shards")] + [
        storage.join(out, "images", manifest.shard_name(s)) for s in shards
    ]:
        storage.remove_temp_files(folder)


def _generate(
    cfg: GenerateConfig, plan: SeedPlan, pending: list[int], ckpt: tuple, run_id: str, lease: Lease
) -> _ShardBuffer:
    """Stream the pending shards through the actors; write each shard once it is complete."""
    files, digest = ckpt
    buffer = _ShardBuffer(cfg.output, plan, digest, run_id, lease, cfg.format)
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
    return buffer


def run_generation(cfg: GenerateConfig) -> dict[str, Any]:
    """Generate every pending seed of the run, validate the manifest, write the contact sheet and
    stats.json; return the summary. With cfg.verify, only check the output; with cfg.repair,
    regenerate what verification finds."""
    began = time.perf_counter()
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
        repaired = _drop_damaged(cfg, plan, lease.token) if cfg.repair else 0
        pending, unusable = _pending_shards(cfg, plan, run_id, digest)
        # 5. Generate what is missing, then check every seed is in the manifest exactly once.
        clock = {"setup": time.perf_counter()}
        buffer = _generate(cfg, plan, pending, (files, digest), run_id, lease) if pending else None
        clock["generation"] = time.perf_counter()
        lease.check()
        rows = verify.validate(cfg.output, plan, run_id, digest, cfg.format)
        if cfg.repair:
            _verify_only(dataclasses.replace(cfg, repair=False), plan, digest, lease.token)
        clock["validation"] = time.perf_counter()
        # 6. What the run looks like (its first seeds) and what it did: OUT/stats.json.
        _write_contact_sheet(cfg.output)
        clock["contact_sheet"] = time.perf_counter()
        marks = [began, *clock.values()]
        seconds = {name: b - a for name, a, b in zip(clock, marks, marks[1:])}
        record = _run_record(cfg, plan, run_id, pending, rows, buffer, seconds | {"wall": marks[-1] - began})
        record["failures"].update(unusable_shards=unusable, repaired_shards=repaired)
        stats.write_stats(cfg.output, stats.run_stats(cfg.output, record))
    finally:
        lease.release()
    return _summary(cfg, plan, pending, seconds["generation"], rows, run_id)


def _write_contact_sheet(out: str) -> None:
    """OUT/contact_sheet.png and .html of the first seeds. An image it cannot read (a damaged output
    that a rerun does not look at) is named and the sheet skipped: the manifest is complete."""
    try:
        contact_sheet.write_contact_sheet(out)
    except (contact_sheet.ContactSheetError, storage.StorageError, OSError) as e:
        _say(f"no contact sheet: {' '.join(str(e).split())[:300]} (--verify checks every image; --repair fixes them)")


def _run_record(
    cfg: GenerateConfig,
    plan: SeedPlan,
    run_id: str,
    pending: list[int],
    rows: int,
    buffer: _ShardBuffer | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The driver's part of stats.json (pipeline/generation/stats.py): counts, seconds, failures."""
    generated = sum(plan.shard_len(s) for s in pending)
    spent = buffer.seconds if buffer else dict.fromkeys(("model_s", "encode_s", "compile_s", "write"), 0.0)
    seconds |= {"actor_model": spent["model_s"], "actor_encode": spent["encode_s"],
                "actor_compile": spent["compile_s"], "driver_write": spent["write"]}  # fmt: skip
    return {
        "run_id": run_id,
        "format": cfg.format,
        "counts": {
            "seeds": plan.count,
            "shards": plan.num_shards,
            "manifest_rows": rows,
            "generated_seeds": generated,
            "generated_shards": len(pending),
            "skipped_shards": plan.num_shards - len(pending),
        },
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "seeds_per_s": round(generated / seconds["generation"], 2) if seconds["generation"] > 0 else 0.0,
        "failures": {"duplicate_rows": buffer.duplicates if buffer else 0},
    }


def _summary(cfg: GenerateConfig, plan: SeedPlan, pending: list[int], seconds: float, rows: int, run_id: str) -> dict:
    generated = sum(plan.shard_len(s) for s in pending)
    summary = {
        "seeds": plan.count,
        "generated": generated,
        "seconds": round(seconds, 2),
        "seeds_per_s": round(generated / seconds, 2) if seconds > 0 else 0.0,
        "output": cfg.output,
        "format": cfg.format,
        "manifest_rows": rows,
        "run_id": run_id,
    }
    _say(
        f"{plan.count} seeds ({generated} generated now) in {seconds:.1f} s, "
        f"{summary['seeds_per_s']} seeds/s -> {cfg.output} ({cfg.format}); manifest rows: {rows}; "
        f"stats: {storage.join(cfg.output, 'stats.json')}"
    )
    return summary
