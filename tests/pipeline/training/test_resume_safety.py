"""Resuming safely, on real Ray Train runs of the tiny model (pipeline/training/resume.py, state.py,
prior_phase.py).

One run is stopped by a failure after epoch 2 of 3 (checkpoints epoch-0001 and epoch-0002). Copies
of it are resumed: with another batch size or worker count or other data, which is refused before
any work; and once with epoch-0002's optimizer file truncated, a batch size of 4 instead of 8
allowed by --allow-changed-setup, and a failure injected after the second of four prior epochs.
That run must fall back to epoch-0001 (the driver says so; the worker, which Ray hands the
corrupt latest checkpoint, falls back the same way), continue the LR schedule from its step with
the length it started with, and resume phase 2 from its prior-0002 checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import ray.train
import torch
from train_builders import failing, metrics_rows, tiny

from jobs.cli import one_line
from model.checkpoint import load_checkpoint
from pipeline.training.config import TrainConfig, TrainError
from pipeline.training.driver import run_training
from pipeline.training.state import read_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stopped(ray_local, data, tmp_path_factory) -> tuple[TrainConfig, dict[int, float]]:
    """3 epochs, ended by a failure after epoch 2's checkpoint; its config and the LR it logged
    at each step."""
    cfg = tiny(data, str(tmp_path_factory.mktemp("stopped")), "run", epochs=3, max_failures=0, log_every=1,
               log_samples=0, wandb_mode="disabled", prior_epochs=4, prior_checkpoint_every=2)  # fmt: skip
    with failing(epoch=2), pytest.raises(Exception, match="injected failure after epoch 2"):
        run_training(cfg)
    return cfg, {r["global_step"]: r["train/lr"] for r in metrics_rows(cfg, "step")}


def copy_of(cfg: TrainConfig, root: Path, **changes) -> TrainConfig:
    """The run copied to another storage path (Ray's record names its checkpoints relatively)."""
    shutil.copytree(Path(cfg.storage_path) / cfg.name, root / cfg.name)
    return cfg.replace(storage_path=str(root), **changes)


@pytest.fixture(scope="module")
def resumed(stopped, tmp_path_factory) -> tuple[TrainConfig, str, str]:
    """A copy resumed with epoch-0002's optimizer truncated, batch size 4 (allowed) and a failure
    after prior epoch 2 (max_failures=1): its config, what the driver printed, the export."""
    cfg = copy_of(stopped[0], tmp_path_factory.mktemp("resumed"), batch_size=4, allow_changed_setup=True,
                  max_failures=1)  # fmt: skip
    optimizer = Path(cfg.storage_path) / cfg.name / "epoch-0002" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), failing(prior_epoch=2):
        export = run_training(cfg)
    return cfg, printed.getvalue(), export


@pytest.mark.slow  # Ray Train runs, stopped and resumed
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(stopped, resumed) -> None:
    cfg, printed, export = resumed
    run = Path(cfg.storage_path) / cfg.name
    bad = run / "epoch-0002"
    line = next(ln for ln in printed.splitlines() if "is unusable" in ln)
    assert line.startswith(f"checkpoint {bad} is unusable ({bad}/optimizer.safetensors: sha256 mismatch: ")
    assert line.endswith(f"; resuming from {run / 'epoch-0001'}")
    # The workers (handed epoch-0002 by Ray) resumed from epoch 1 too: epoch 2 ran again, on from
    # epoch 1's step count, with twice the steps of batch 4.
    first = metrics_rows(stopped[0], "epoch")[0]["global_step"]
    epochs = metrics_rows(cfg, "epoch")
    steps = [r["global_step"] for r in epochs]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and steps[0] == first
    assert steps[1] - steps[0] == steps[2] - steps[1] in (2 * first, 2 * first + 1)
    # Every checkpoint Ray keeps is whole: the redone epoch 2 did not land in the corrupt one's folder.
    kept = [c.path for c, _ in ray.train.Result.from_path(str(run)).best_checkpoints]
    assert len(kept) == len(set(kept))
    for path in kept:
        if path != str(bad):
            read_checkpoint(ray.train.Checkpoint(path))
    assert load_checkpoint(export).extra["phase"] == "done"


@pytest.mark.slow  # Ray Train runs, stopped and resumed
@pytest.mark.parametrize("change", ["batch_size", "num_workers", "data"])
def test_a_resume_with_another_setup_is_refused_naming_what_changed(stopped, tmp_path, change: str) -> None:
    cfg = copy_of(stopped[0], tmp_path / "runs")
    if change == "batch_size":
        cfg, expected = cfg.replace(batch_size=4), "(batch_size 8 -> 4)"
    elif change == "num_workers":
        cfg, expected = cfg.replace(num_workers=2), "(num_workers 1 -> 2)"
    else:
        shutil.copytree(cfg.data, tmp_path / "data")
        metadata = tmp_path / "data" / "metadata.jsonl"
        metadata.write_text("".join(metadata.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
        cfg, expected = cfg.replace(data=str(tmp_path / "data")), f"(the data at {tmp_path / 'data'} (digest "
    before = sorted(p.name for p in (tmp_path / "runs" / cfg.name).iterdir())
    with pytest.raises(TrainError) as refused:
        run_training(cfg)
    message = str(refused.value)
    assert message.startswith(f"run {tmp_path / 'runs' / cfg.name} was started with another setup {expected}")
    assert "pass --allow-changed-setup to continue with the new ones" in message
    assert sorted(p.name for p in (tmp_path / "runs" / cfg.name).iterdir()) == before, "nothing was written"


@pytest.mark.slow  # Ray Train runs, stopped and resumed
def test_the_lr_schedule_continues_from_its_step_with_the_length_it_started_with(stopped, resumed) -> None:
    """Batch 4 doubles the steps per epoch; the schedule keeps its 3 x 18-step length, so the LR at
    every step equals the stopped run's at that step, and reaches the floor at the original end."""
    (first_cfg, lr_before), (cfg, printed, _) = stopped, resumed
    lr_after = {r["global_step"]: r["train/lr"] for r in metrics_rows(cfg, "step")}
    spe = metrics_rows(first_cfg, "epoch")[0]["global_step"]
    redone = range(spe + 1, 2 * spe + 1)  # epoch 2 of the stopped run's first attempt
    assert [lr_after[s] for s in redone] == pytest.approx([lr_before[s] for s in redone], rel=1e-9)
    assert lr_after[3 * spe] == pytest.approx(cfg.lr * cfg.min_lr_ratio) == lr_after[max(lr_after)]
    assert lr_after[3 * spe - 5] > 1.01 * cfg.lr * cfg.min_lr_ratio  # still decaying before the end
    assert "continues with a changed setup (batch_size 8 -> 4; --allow-changed-setup); its LR schedule keeps its " \
           f"{3 * spe} steps" in printed  # fmt: skip
    final = json.loads((Path(cfg.storage_path) / cfg.name / "final" / "train_state.json").read_text())["state"]
    assert final["setup"]["total_steps"] == 3 * spe and final["setup"]["batch_size"] == 4


@pytest.mark.slow  # Ray Train runs, stopped and resumed
def test_a_failure_in_the_prior_phase_resumes_from_its_checkpoint(resumed) -> None:
    """The failure after prior epoch 2 restarted the workers from prior-0002: phase 2 went on from
    epoch 3 (no step logged twice) and phase 1 was not redone."""
    cfg, _, export = resumed
    summary = [r for r in metrics_rows(cfg, "prior") if "prior/start_epoch" in r]
    assert len(summary) == 1 and summary[0]["prior/start_epoch"] == 2 and summary[0]["prior_epoch"] == 4
    steps = [r["prior/step"] for r in metrics_rows(cfg, "prior") if "prior/step" in r]
    assert steps == list(range(1, int(summary[0]["prior/steps"]) + 1)) and len(steps) % 4 == 0
    assert [r["epoch"] for r in metrics_rows(cfg, "epoch")] == [1, 2, 3]
    final = json.loads((Path(cfg.storage_path) / cfg.name / "final" / "train_state.json").read_text())
    assert (final["state"]["phase"], final["state"]["prior_epoch"]) == ("done", 4)
    assert "prior_scheduler" in final and (Path(cfg.storage_path) / cfg.name / "final" / "prior_optimizer.safetensors").is_file()
    ink = load_checkpoint(export)
    assert not torch.allclose(ink.model.prior.latent_std, torch.ones_like(ink.model.prior.latent_std))


@pytest.mark.slow  # Ray Train runs, stopped and resumed
def test_when_every_kept_checkpoint_is_corrupt_the_run_stops_with_one_line(stopped, tmp_path) -> None:
    cfg = copy_of(stopped[0], tmp_path)
    run = tmp_path / cfg.name
    (run / "epoch-0002" / "train_state.json").write_text('{"state": ')
    weights = run / "epoch-0001" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(TrainError) as failed:
        run_training(cfg)
    line = one_line(failed.value)
    assert line.startswith(f"checkpoint {run}/epoch-0002 is unusable ({run}/epoch-0002/train_state.json: not readable")
    assert line.endswith(f"the 1 earlier checkpoints kept are unusable too (num_to_keep): restore the damaged file, "
                         f"or start over: delete {run} or choose another --name")  # fmt: skip


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "-rf", "tab\tname", "x" * 101, "naïve"])
def test_a_run_name_must_be_a_plain_folder_name(name: str) -> None:
    with pytest.raises(ValueError, match=r"^--name .* choose a plain folder name such as base-v1$"):
        TrainConfig(name=name)


def test_plain_run_names_are_accepted() -> None:
    for name in ("base-v1", "run_2.5", "A" * 100, "..x", "x-"):
        assert TrainConfig(name=name).name == name
