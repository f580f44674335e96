"""pipeline/training/metrics_log.py with real W&B in offline mode: both sinks get every row,
the step metrics are declared as the trainer logs them, and a resume drops lost work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.training.metrics_log import RunLogger, resolve_wandb_mode, wandb_dir, wandb_run_id


def make_logger(run: Path, resume_step: int = 0, mode: str = "offline") -> RunLogger:
    return RunLogger(
        str(run), project="inkseed-test", mode=mode, run_id=wandb_run_id(str(run.parent), run.name),
        local_dir=wandb_dir(str(run.parent), run.name), config={"preset": "tiny"}, resume_step=resume_step,
    )


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rows_reach_metrics_jsonl_and_an_offline_wandb_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    log = make_logger(run)
    try:
        log.log({"train/loss_total": 1.5, "global_step": 50}, kind="step")
        log.log({"epoch": 1, "global_step": 60, "train_epoch/loss_total": 1.2, "val/loss_total": 1.3}, kind="epoch")
    finally:
        log.finish()
    got = rows(run)
    assert [r["kind"] for r in got] == ["step", "epoch"]
    assert got[1]["train_epoch/loss_total"] == 1.2
    offline = list((run / "wandb").rglob("*.wandb"))
    assert offline, "no offline W&B run file written under the run folder"


def test_wandb_step_metrics_match_the_trainers_names() -> None:
    """The prefixes declared against `epoch` are the ones worker.epoch_metrics writes."""
    source = (Path(__file__).resolve().parents[3] / "pipeline" / "training" / "metrics_log.py").read_text()
    worker = (Path(__file__).resolve().parents[3] / "pipeline" / "training" / "worker.py").read_text()
    assert '("train_epoch", train_m)' in worker and '"train_epoch/*"' in source
    assert "epoch_train" not in source + worker


def test_a_resume_drops_rows_past_the_restored_step_and_every_prior_row(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r2"
    log = make_logger(run, mode="disabled")
    for step in (50, 100, 150):
        log.log({"global_step": step}, kind="step")
    log.log({"global_step": 150, "prior/loss": 0.5}, kind="prior")
    again = make_logger(run, resume_step=100, mode="disabled")  # the checkpoint was at step 100
    again.log({"global_step": 110}, kind="step")
    assert [(r["kind"], r["global_step"]) for r in rows(run)] == [("step", 50), ("step", 100), ("step", 110)]


def test_auto_mode_is_offline_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert wandb_run_id("runs", "a") == wandb_run_id("runs/", "a") != wandb_run_id("runs", "b")


def test_a_resume_from_a_prior_checkpoint_keeps_the_prior_rows_up_to_it(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r3"
    log = make_logger(run, mode="disabled")
    for step in (1, 2, 3, 4):
        log.log({"global_step": 60, "prior/step": step, "prior/loss": 0.5}, kind="prior")
    log.log({"global_step": 60, "prior/loss": 0.4, "prior/steps": 4}, kind="prior")  # the summary
    again = RunLogger(str(run), project="inkseed-test", mode="disabled", run_id="x", local_dir=str(tmp_path / "w"),
                      config={}, resume_step=60, resume_prior_step=2)  # fmt: skip
    again.log({"global_step": 60, "prior/step": 3, "prior/loss": 0.3}, kind="prior")
    assert [r.get("prior/step") for r in rows(run)] == [1, 2, 3]
