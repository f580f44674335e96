"""Every job ends a failure with one line, `error: ...`, naming the file or URI and what to do, and
no traceback (`--debug` shows it): jobs.train, jobs.prepare_data, jobs.evaluate and jobs.export run
as `python -m jobs.X` subprocesses against a full disk (a tiny tmpfs, filled, in a mount
namespace), a folder they may not write (as root: with CAP_DAC_OVERRIDE dropped), a corrupt
checkpoint or run file, a missing S3 bucket (moto's server) and missing data. None of these
cases starts Ray: the jobs check their inputs first."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint import save_checkpoint

from builders import scrambled_tiny

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0
# As root, the permission bits are enforced only without these capabilities.
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def run_job(job: str, *args: str, full_disk: Path | None = None, unprivileged: bool = False) -> list[str]:
    """`python -m jobs.<job> ARGS`: asserts it failed with exit status 1; returns its stderr lines.
    `full_disk`: a filled 64 KiB tmpfs is mounted there first (in a user + mount namespace, so it
    vanishes with the process); `unprivileged`: run without the right to write read-only folders."""
    command = [sys.executable, "-m", f"jobs.{job}", *args]
    if full_disk is not None:
        full_disk.mkdir(exist_ok=True)
        script = (f"mount -t tmpfs -o size=64k tmpfs {full_disk} && "
                  f"(dd if=/dev/zero of={full_disk}/fill bs=4k 2>/dev/null; exec {shlex.join(command)})")  # fmt: skip
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    elif unprivileged and ROOT:
        command = [*NO_DAC, *command]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-1000:] + done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, tok = scrambled_tiny(["a print of a ship at sea", "an etching of a windmill"])
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(path, model, tok)
    return path


@pytest.fixture
def read_only(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def some_data(tmp_path: Path) -> Path:
    """A folder that passes the training job's first check (it exists and is not empty)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a ship"}\n')
    return tmp_path / "data"


# -- jobs.train ---------------------------------------------------------------------------------
@pytest.mark.slow  # a job subprocess (tests/pipeline/training checks the same error in-process)
def test_train_missing_data(tmp_path: Path) -> None:
    lines = run_job("train", "--data", str(tmp_path / "nowhere"), "--storage-path", str(tmp_path / "runs"))
    assert lines[-1] == f"error: data URI '{tmp_path / 'nowhere'}' does not exist (make one with `python -m jobs.prepare_data`)"


def test_train_bad_run_name(tmp_path: Path) -> None:
    lines = run_job("train", "--name", "../elsewhere", "--storage-path", str(tmp_path))
    assert lines[-1] == ("error: --name '../elsewhere' has characters other than letters, digits, '.', '_' "
                         "and '-': choose a plain folder name such as base-v1")  # fmt: skip


@pytest.mark.slow  # a job subprocess with an injected fault
def test_train_disk_full(tmp_path: Path, some_data: Path) -> None:
    full = tmp_path / "full"
    lines = run_job("train", "--data", str(some_data), "--storage-path", str(full / "runs"), full_disk=full)
    assert lines[-1] == (f"error: storage path: output '{full / 'runs'}' is not writable: no space left on "
                         "device: free space there or choose another output")  # fmt: skip


@pytest.mark.slow  # a job subprocess with an injected fault
def test_train_permission_denied(read_only: Path, some_data: Path) -> None:
    lines = run_job("train", "--data", str(some_data), "--storage-path", str(read_only / "runs"), unprivileged=True)
    assert lines[-1] == (f"error: storage path: output '{read_only / 'runs'}' is not writable: permission "
                         "denied: fix the permissions or choose another output")  # fmt: skip


@pytest.mark.slow  # a job subprocess with an injected fault
def test_train_missing_s3_bucket(s3_server, some_data: Path) -> None:
    lines = run_job("train", "--data", str(some_data), "--storage-path", "s3://inkseed-no-such-bucket/runs")
    assert lines[-1].startswith("error: storage path: output 's3://inkseed-no-such-bucket/runs' is not writable: ")
    assert lines[-1].endswith("(check the bucket, your AWS credentials and AWS_ENDPOINT_URL)")


@pytest.mark.slow  # a job subprocess with an injected fault
def test_train_corrupt_run_record(tmp_path: Path, some_data: Path) -> None:
    snapshot = tmp_path / "runs" / "r1" / "checkpoint_manager_snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text('{"ray_version": "2.60.0", "checkpoint_res')
    lines = run_job("train", "--data", str(some_data), "--storage-path", str(tmp_path / "runs"), "--name", "r1")
    assert lines[-1].startswith(f"error: {snapshot} is unreadable (")
    assert lines[-1].endswith("): restore it, or start a new run with another --name")


# -- jobs.prepare_data --------------------------------------------------------------------------
@pytest.mark.slow  # a job subprocess with an injected fault
def test_prepare_data_disk_full(tmp_path: Path) -> None:
    full = tmp_path / "full"
    lines = run_job("prepare_data", "--out", str(full / "data"), "--count", "4", "--size", "64", full_disk=full)
    assert lines[-1] == (f"error: output '{full / 'data'}' is not writable: no space left on device: free "
                         "space there or choose another output")  # fmt: skip


@pytest.mark.slow  # a job subprocess with an injected fault
def test_prepare_data_permission_denied(read_only: Path) -> None:
    lines = run_job("prepare_data", "--out", str(read_only / "data"), "--count", "4", unprivileged=True)
    assert lines[-1] == (f"error: output '{read_only / 'data'}' is not writable: permission denied: fix the "
                         "permissions or choose another output")  # fmt: skip


@pytest.mark.slow  # a job subprocess with an injected fault
def test_prepare_data_missing_s3_bucket(s3_server) -> None:
    lines = run_job("prepare_data", "--out", "s3://inkseed-no-such-bucket/data", "--count", "4")
    assert lines[-1].startswith("error: output 's3://inkseed-no-such-bucket/data' is not writable: ")
    assert lines[-1].endswith("(check the bucket, your AWS credentials and AWS_ENDPOINT_URL)")


# -- jobs.evaluate ------------------------------------------------------------------------------
@pytest.mark.slow  # a job subprocess with an injected fault
def test_evaluate_corrupt_checkpoint(checkpoint: Path, tmp_path: Path, some_data: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:1000])
    lines = run_job("evaluate", "--checkpoint", str(bad), "--data", str(some_data), "--out", str(tmp_path / "eval"))
    assert lines[-1].startswith(f"error: {bad}/model.safetensors: truncated or corrupt safetensors file (")


@pytest.mark.slow  # a job subprocess with an injected fault
def test_evaluate_missing_s3_bucket(s3_server, tmp_path: Path, some_data: Path) -> None:
    uri = "s3://inkseed-no-such-bucket/ckpt"
    lines = run_job("evaluate", "--checkpoint", uri, "--data", str(some_data), "--out", str(tmp_path / "eval"))
    assert lines[-1].startswith(f"error: {uri}/config.json: missing or unreadable (")


# -- jobs.export --------------------------------------------------------------------------------
def edited(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint whose config.json was edited after saving."""
    bad = tmp_path / "edited"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = bad / "config.json"
    config.write_text(config.read_text().replace('"ddim_steps": 20', '"ddim_steps": 21'))
    return bad


def test_export_corrupt_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    bad = edited(checkpoint, tmp_path)
    lines = run_job("export", "--checkpoint", str(bad), "--out", str(tmp_path / "onnx"))
    assert lines[-1].startswith(f"error: {bad}/config.json: sha256 mismatch: its content differs from what was saved")
    assert lines[-1].endswith("restore it, or re-export the checkpoint")


@pytest.mark.slow  # a job subprocess with an injected fault
def test_export_permission_denied(checkpoint: Path, read_only: Path) -> None:
    out = read_only / "onnx"
    lines = run_job("export", "--checkpoint", str(checkpoint), "--out", str(out), unprivileged=True)
    assert lines[-1] == f"error: {out}: permission denied: fix the permissions or choose another output"


@pytest.mark.slow  # a job subprocess with --debug
def test_debug_shows_the_traceback_instead(checkpoint: Path, tmp_path: Path) -> None:
    bad = edited(checkpoint, tmp_path)
    done = subprocess.run([sys.executable, "-m", "jobs.export", "--checkpoint", str(bad), "--debug"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"model.checkpoint.CheckpointError: {bad}/config.json")


def test_a_ray_train_worker_error_is_described_as_the_worker_raised_it() -> None:
    """Ray Train's WorkerGroupError keeps each rank's exception itself (checked on Ray 2.60); the
    line describes the lowest rank's, e.g. a full disk under a checkpoint write."""
    import errno

    from ray.train import WorkerGroupError

    from jobs.cli import one_line

    disk = OSError(errno.ENOSPC, "No space left on device", "/runs/r1/epoch-0003/optimizer.safetensors")
    failed = WorkerGroupError("[Rank 0 Error Snippet]: ...", {1: RuntimeError("rank 1"), 0: disk})
    assert one_line(failed) == ("/runs/r1/epoch-0003/optimizer.safetensors: no space left on device: free space "
                                "there or choose another output")  # fmt: skip
