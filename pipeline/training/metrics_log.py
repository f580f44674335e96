"""Where rank 0 of the training job writes its metrics: W&B and a plain metrics.jsonl.

Every scalar goes to both sinks, so a run can be read without W&B (`pandas.read_json(path,
lines=True)` or DuckDB's `read_json_auto`). W&B runs online only when `WANDB_API_KEY` is set
(or the mode says so), offline otherwise; its files live under the run folder for local storage
and under a local temp folder for s3:// storage (W&B writes through the local filesystem only).
The W&B run id is derived from the run's storage path and name, so a resumed run (after a
worker failure, or the same command run again) appends to the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pipeline import storage

WandbMode = Literal["auto", "online", "offline", "disabled"]


def wandb_run_id(storage_path: str, name: str) -> str:
    """A stable W&B run id for one training run (same storage path + name -> same id)."""
    return hashlib.sha1(f"{storage_path.rstrip('/')}|{name}".encode()).hexdigest()[:16]


def wandb_dir(storage_path: str, name: str) -> str:
    """W&B's local folder: `<storage>/<name>/wandb` for local storage; for s3:// storage a
    local folder (`$WANDB_DIR/inkseed/<name>/wandb`, or under the temp dir without WANDB_DIR),
    since W&B writes local files only."""
    if storage.is_s3(storage_path):
        return os.path.join(os.environ.get("WANDB_DIR") or tempfile.gettempdir(), "inkseed", name, "wandb")
    return storage.join(storage.filesystem(storage_path)[1], name, "wandb")


def resolve_wandb_mode(mode: WandbMode) -> Literal["online", "offline", "disabled"]:
    """"auto" is online with an API key in the environment, offline without one."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class RunLogger:
    """Rank 0's metrics sink: `log` sends scalars to W&B and appends them to metrics.jsonl.

    metrics.jsonl lives at `<run_dir>/metrics.jsonl` (local or s3://). It is rewritten whole
    on each `log` (an S3 object cannot be appended to; the file stays small: one line per
    `log_every` steps and per epoch), after reading back what earlier attempts of the run wrote
    up to `resume_step` (the restored checkpoint's step), for phase-2 rows up to
    `resume_prior_step` (0 unless a phase-2 checkpoint was restored; all once past phase 2) and
    for phase-3 rows up to `resume_sharpen_step`: rows of work lost in a
    failure are dropped, since that work is done again.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        project: str,
        mode: WandbMode,
        run_id: str,
        local_dir: str,
        config: dict[str, Any],
        resume_step: int = 0,
        resume_prior_step: float = 0,
        resume_sharpen_step: int = 0,
    ) -> None:
        self.metrics_uri = storage.join(run_dir, "metrics.jsonl")
        self._lines: list[str] = []
        if storage.exists(self.metrics_uri):
            lines = storage.read_bytes(self.metrics_uri).decode().splitlines()
            resumed = (resume_step, resume_prior_step, resume_sharpen_step)
            self._lines = [x for x in lines if _kept_on_resume(json.loads(x), *resumed)]
        self.run = None
        resolved = resolve_wandb_mode(mode)
        if resolved != "disabled":
            self.run = _init_wandb(project, resolved, run_id, local_dir, config)

    def log(self, metrics: dict[str, float], *, kind: Literal["step", "epoch", "prior", "sharpen"]) -> None:
        """Send one row of scalars (must include `global_step`) to both sinks."""
        row = {"kind": kind, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._lines.append(json.dumps(row))
        storage.write_bytes(self.metrics_uri, ("\n".join(self._lines) + "\n").encode())
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if not isinstance(v, (list, tuple))})

    def log_samples(
        self,
        epoch: int,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
    ) -> None:
        """A W&B table of sample rows; numpy uint8 (H, W) cells become images. Also logs the
        first image column as a captioned image list, which offline runs keep as PNG files."""
        if self.run is None:
            return
        import wandb

        def cell(v: Any) -> Any:
            return wandb.Image(v) if isinstance(v, np.ndarray) else v

        table = wandb.Table(columns=list(columns), data=[[cell(v) for v in row] for row in rows])
        gallery = [wandb.Image(row[1], caption=str(row[2])) for row in rows]
        self.run.log({"samples/table": table, "samples/generated": gallery, "epoch": epoch})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _init_wandb(project: str, mode: str, run_id: str, local_dir: str, config: dict[str, Any]):
    import wandb

    os.makedirs(local_dir, exist_ok=True)
    # Offline tables stage their media for a later `wandb sync`: keep them with the run, not in ~.
    os.environ.setdefault("WANDB_DATA_DIR", os.path.join(local_dir, "data"))
    run = wandb.init(
        project=project,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=local_dir,
        config=config,
        # Console capture and system stats threads cost CPU that training needs on small hosts.
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    # Step-level scalars are plotted against global_step, epoch-level ones against epoch.
    run.define_metric("global_step")
    run.define_metric("epoch")
    run.define_metric("train/*", step_metric="global_step")
    for prefix in ("train_epoch/*", "val/*", "perf/*", "samples/*"):
        run.define_metric(prefix, step_metric="epoch")
    run.define_metric("prior/*", step_metric="global_step")
    run.define_metric("sharpen/step")
    run.define_metric("sharpen/*", step_metric="sharpen/step")
    return run


def _kept_on_resume(row: dict[str, Any], resume_step: int, resume_prior_step: float, resume_sharpen_step: int) -> bool:
    """A row of work the restored checkpoint holds. A phase's rows up to its checkpoint's step;
    its summary row (no step) is written again unless the checkpoint is past that phase."""
    if row["kind"] == "prior":
        return row.get("prior/step", math.inf) <= resume_prior_step
    if row["kind"] == "sharpen":
        return row.get("sharpen/step", math.inf) <= resume_sharpen_step
    return row.get("global_step", 0) <= resume_step


def _plain(v: Any) -> Any:
    """JSON-able scalar (tensors and numpy numbers become Python numbers)."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
