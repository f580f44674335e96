"""pipeline/generation/chaos.py, small: SIGKILL the driver or an actor of a real `python -m jobs.generate`
run at random moments, then finish and `--verify`: no seed lost, duplicated or mismatched."""

from __future__ import annotations

import pytest

from model.checkpoint import save_checkpoint
from pipeline.generation.chaos import run_fault_injection

from builders import scrambled_tiny


@pytest.mark.slow  # several real driver processes, killed and restarted
def test_kills_at_random_points_lose_nothing(ray_local, tmp_path):
    """Schedule seed 3: an actor is killed 3.5 s after the pool starts, then the driver 3.1 s later."""
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, *scrambled_tiny(["an engraving of a tower", "a print of a ship at sea"], seed=0))
    args = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "out"), "--num-seeds", "120",
            "--shard-size", "10", "--batch-size", "10", "--steps", "3", "--max-actors", "1"]  # fmt: skip
    raylet = ray_local._private.worker._global_node.all_processes["raylet"][0].process.pid
    report = run_fault_injection(
        args, kills=2, ray_address=ray_local.get_runtime_context().gcs_address, raylet_pid=raylet,
        seed=3, max_delay=6.0, workdir=tmp_path,
    )  # fmt: skip
    print("\n".join(report.lines()))
    assert report.actor_kills == 1 and report.driver_kills <= 1
    assert report.failures == [] and report.final_ok
    assert report.survived == report.driver_kills + report.actor_kills
    assert (report.expected, report.lost, report.duplicated, report.mismatched) == (120, 0, 0, 0)
