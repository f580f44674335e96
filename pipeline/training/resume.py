"""Where a run resumes: the latest usable checkpoint, and whether today's setup may continue it.

Ray Train hands the workers its latest checkpoint (`ray.train.get_checkpoint()`), both when the
same command runs again and when it restarts failed workers. When that checkpoint is corrupt
(cut short by a crash or a full disk, or damaged since: state.read_checkpoint verifies every
file), `choose` falls back to the newest earlier one the run still keeps (Ray Train keeps
`num_to_keep`, the latest among them) and says so in one line naming both. The driver makes the
same choice before any work (from `ray.train.Result.from_path`, Ray's own record of the run),
the workers again when they start (from `ray.train.get_all_reported_checkpoints()`), so a
restart after a worker failure falls back too.

A resume must continue the run it started as: `check_setup` refuses (before any work) one whose
data, batch_size or num_workers differ from the run's start, naming what changed, unless
`allow_changed_setup`. The data digest is cheap but real: the sha256 of the dataset's metadata
files and of the names and sizes of every file under it (hidden ones, such as the evaluation's
`.probe/` cache, left out).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow.fs as pafs
import ray.train

from model.checkpoint import CheckpointError
from pipeline import storage
from pipeline.training.config import TrainConfig, TrainError, run_dir
from pipeline.training.state import Restored, read_checkpoint, uri_of

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
SETUP_KEYS = ("data_digest", "batch_size", "num_workers")
Reported = Sequence[tuple[ray.train.Checkpoint, dict[str, Any]]]


def progress(metrics: dict[str, Any]) -> tuple[int, float, int]:
    """How far into the run a checkpoint's reported metrics are: (phase-1, phase-2, phase-3
    steps). Checkpoints from before phase 2 was checkpointed report its total as `prior/steps`."""
    prior = float(metrics.get("prior_step", metrics.get("prior/steps", 0)))
    return int(metrics.get("global_step", 0)), prior, int(metrics.get("sharpen_step", 0))


def run_checkpoints(cfg: TrainConfig) -> tuple[ray.train.Checkpoint | None, Reported]:
    """The run's latest checkpoint and every checkpoint Ray Train keeps, with their metrics
    ((None, []) for a new run); TrainError when Ray's record of the run is unreadable."""
    snapshot = storage.join(run_dir(cfg), SNAPSHOT)
    if not storage.exists(snapshot):  # a new run, or one that never reported a checkpoint
        return None, []
    fs, path = storage.filesystem(run_dir(cfg))
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except Exception as e:  # noqa: BLE001  (Ray raises RuntimeError or its own RayTrainError types)
        raise TrainError(
            f"{snapshot} is unreadable ({storage.describe(e)}): restore it, or start a new run with another --name"
        ) from e
    return result.checkpoint, result.best_checkpoints


def choose(
    latest: ray.train.Checkpoint | None,
    reported: Callable[[], Reported],
    run: str,
    say: Callable[[str], None] = print,
) -> Restored | None:
    """The latest checkpoint, verified and read; when it is corrupt, the newest earlier one that
    is not (saying so in one line). `reported` lists the run's checkpoints (called only on a
    fallback). TrainError when none is usable."""
    if latest is None:
        return None
    try:
        return read_checkpoint(latest)
    except CheckpointError as e:
        first = e
    problems = [f"checkpoint {uri_of(latest)} is unusable ({first})"]
    earlier = sorted((p for p in reported() if p[0].path != latest.path), key=lambda p: progress(p[1]), reverse=True)
    for checkpoint, _ in earlier:
        try:
            restored = read_checkpoint(checkpoint)
        except CheckpointError as e:
            problems.append(f"so is {uri_of(checkpoint)} ({e.problem})")
            continue
        say(f"{'; '.join(problems)}; resuming from {uri_of(checkpoint)}")
        return restored
    kept = f"the {len(earlier)} earlier checkpoints kept are unusable too" if earlier else "no earlier checkpoint is kept"
    raise TrainError(
        f"{'; '.join(problems[:1])} and {kept} (num_to_keep): restore the damaged file, or start "
        f"over: delete {run} or choose another --name"
    )


def data_digest(uri: str) -> str:
    """sha256 of the dataset's metadata files' bytes and of the names and sizes of the files
    under it (module docstring); for one Parquet file, of its name and size."""
    fs, path = storage.filesystem(uri)
    h = hashlib.sha256()
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            h.update(f"{posixpath.basename(path)}\0{info.size}\n".encode())
            return h.hexdigest()
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except Exception as e:  # noqa: BLE001  (every backend error means the same to the user)
        raise TrainError(f"data URI {uri!r} cannot be listed: {storage.describe(e)}") from e
    files = sorted(
        (posixpath.relpath(i.path, path), i.size) for i in infos
        if i.type == pafs.FileType.File and not any(p.startswith(".") for p in posixpath.relpath(i.path, path).split("/"))
    )  # fmt: skip
    for rel, size in files:
        h.update(f"{rel}\0{size}\n".encode())
        if rel in ("metadata.jsonl", "metadata.csv"):
            h.update(storage.read_bytes(storage.join(uri, rel)))
    return h.hexdigest()


def current_setup(cfg: TrainConfig) -> dict[str, Any]:
    """The setup a resume is compared on (SETUP_KEYS)."""
    return {"data_digest": data_digest(cfg.data), "batch_size": cfg.batch_size, "num_workers": cfg.num_workers}


def check_setup(saved: dict[str, Any], now: dict[str, Any], cfg: TrainConfig, say: Callable[[str], None] = print) -> None:
    """Refuse a resume whose data, batch_size or num_workers differ from the run's start (before
    any work), unless cfg.allow_changed_setup: then say what changed and continue."""
    changed = []
    for key in SETUP_KEYS:
        if key in saved and saved[key] != now[key]:
            old, new = saved[key], now[key]
            if key == "data_digest":
                changed.append(f"the data at {cfg.data} (digest {str(old)[:12]} -> {str(new)[:12]})")
            else:
                changed.append(f"{key} {old!r} -> {new!r}")
    if not changed:
        return
    what = "; ".join(changed)
    if not cfg.allow_changed_setup:
        raise TrainError(
            f"run {run_dir(cfg)} was started with another setup ({what}): resume it with the data, "
            "--batch-size and --num-workers it started with, pass --allow-changed-setup to continue "
            "with the new ones, or start a new run with another --name"
        )
    total = saved.get("total_steps")
    say(f"run {run_dir(cfg)} continues with a changed setup ({what}; --allow-changed-setup)"
        + (f"; its LR schedule keeps its {total} steps" if total else ""))  # fmt: skip
