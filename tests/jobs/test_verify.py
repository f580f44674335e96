"""jobs/verify.py: `python -m jobs.verify OUT` on a real generation output, sound and damaged: the
report names each damaged part, exits 1 with one error line; a sound output exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import save_checkpoint
from pipeline.generation.config import GenerateConfig
from pipeline.generation.run import run_generation

from builders import scrambled_tiny

REPO = Path(__file__).resolve().parents[2]


def verify_cli(out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.verify", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow  # a generation run, then the job's command twice (subprocesses joining Ray)
def test_verify_job_reports_and_exits_by_the_result(ray_local, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, *scrambled_tiny(["an engraving of a tower", "a print of a ship at sea"], seed=0))
    out = tmp_path / "out"
    run_generation(GenerateConfig(checkpoint=str(ckpt), output=str(out), num_seeds=20, shard_size=10,
                                  batch_size=10, steps=3, max_actors=1))  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

    sound = verify_cli(out, env)
    assert sound.returncode == 0, sound.stderr[-2000:]
    assert "seeds: expected 20, lost 0, duplicated 0, mismatched 0" in sound.stdout

    (out / "images" / "00001" / "15.png").unlink()
    part = out / "manifest" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    damaged = verify_cli(out, env)
    assert damaged.returncode == 1
    assert "part-00000.parquet: unreadable (ArrowInvalid" in damaged.stdout
    assert "part-00001.parquet: damaged (1 images bad: images/00001/15.png missing)" in damaged.stdout
    assert "seeds: expected 20, lost 10, duplicated 0, mismatched 1" in damaged.stdout
    last = damaged.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out} failed verification") and "--repair" in last
    assert "Traceback" not in damaged.stderr
