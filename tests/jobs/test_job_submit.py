"""The users' real path, end to end: `ray start --head`, then `ray job submit --working-dir .`.

A private head node (its own free ports, its own temp dir, its own token file) is started with
Ray 2.60 token authentication, exactly as README.md tells users to, and stopped in teardown by
signalling only the processes it started: other Ray instances on the machine are left alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


@dataclass
class Head:
    dashboard: str  # the job submission address, http://127.0.0.1:<port>
    env: dict[str, str]  # what a user's shell holds: RAY_AUTH_MODE=token and the token's path
    temp_dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(size: int) -> int:
    """First port of `size` consecutive ports free right now (Ray's worker ports)."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(40000)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports")


def wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the job API answers an authenticated request with 200."""
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise TimeoutError(f"dashboard at {url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (Ray puts its temp dir on every process it starts)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def stop_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """`ray stop` would stop every Ray on the machine: signal only this head's processes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass  # what is left is killed below: the node's state dies with its temp dir anyway
    stragglers = set(processes_mentioning(str(temp_dir)))
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session `ray start` led (start_new_session)
    except ProcessLookupError:
        pass
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short path: Ray's unix sockets live under the temp dir and must stay under 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="inkseed-ray-", dir="/tmp"))
    token_file = temp_dir / "auth_token"
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes to ~/.ray/auth_token
    token_file.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),  # a private token file, not the shared ~/.ray/auth_token
        RAY_USAGE_STATS_ENABLED="0",
        # Inherited by the job drivers and their workers: 2 cores are shared by everything here.
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    dashboard_port = free_port()
    worker_ports = free_port_range(64)
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        "--num-cpus=4",
        f"--object-store-memory={512 * 1024**2}",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--min-worker-port={worker_ports}",
        f"--max-worker-port={worker_ports + 63}",
    ]  # fmt: skip
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(url, token, proc, log)
        yield Head(dashboard=url, env=env, temp_dir=temp_dir)
    finally:
        stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head: Head, *args: str, timeout: float = 60, env: dict[str, str] | None = None):
    return subprocess.run(
        [RAY, "job", *args, "--address", head.dashboard],
        cwd=REPO, env=env or head.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def submit(head: Head, *entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit --working-dir . -- <entrypoint>` from the repository root, as a user types
    it; waits for the end and returns the job's logs. Fails the test unless the job SUCCEEDED."""
    submission_id = f"inkseed-test-{uuid.uuid4().hex[:8]}"
    args = ["submit", "--submission-id", submission_id, "--working-dir", ".", "--log-style", "record"]
    try:
        done = subprocess.run(
            [RAY, "job", *args, "--address", head.dashboard, "--", *entrypoint],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        ray_job(head, "stop", submission_id)
        logs = ray_job(head, "logs", submission_id).stdout
        pytest.fail(f"job {entrypoint} still running after {timeout}s; logs:\n{logs[-5000:]}")
    status = ray_job(head, "status", submission_id, "--log-style", "record").stdout
    assert done.returncode == 0 and f"Job '{submission_id}' succeeded" in status, (
        f"job {entrypoint} failed (exit {done.returncode}):\n{status}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    )
    return ray_job(head, "logs", submission_id).stdout


def test_a_job_runs_with_the_repository_as_working_dir(head):
    probe = (
        "import json, os, ray; from pipeline import storage; ray.init(); "
        "in_repo = ray.remote(lambda: os.path.exists('pyproject.toml')); "
        "print('RESULT', json.dumps({'files': sorted(os.listdir('.')), 'storage': storage.__file__, "
        "'worker_in_repo': ray.get(in_repo.remote())}))"
    )
    logs = submit(head, "python", "-c", probe, timeout=300)
    result = json.loads(next(line for line in logs.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
    assert {"pyproject.toml", "model", "pipeline", "jobs"} <= set(result["files"])
    # Ray 2.60 leaves .git out by default; .gitignore keeps data/, runs/, outputs/ and caches out.
    assert not {".git", "data", "runs", "outputs", "eval", ".pytest_cache"} & set(result["files"])
    # The driver imports the uploaded copy of the package, not the checkout it was submitted from,
    # and the job's Ray workers start in that same copy.
    assert not result["storage"].startswith(str(REPO))
    assert result["worker_in_repo"] is True


def test_token_auth_is_enforced(head):
    wrong = dict(head.env, RAY_AUTH_TOKEN=secrets.token_hex(32))  # RAY_AUTH_TOKEN outranks the file
    refused = ray_job(head, "list", env=wrong)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()
    assert ray_job(head, "list").returncode == 0


def readme_queries(out: str) -> list[str]:
    """The DuckDB queries README.md shows, pointed at `out` instead of the demo's output."""
    text = (REPO / "README.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    assert len(queries) >= 4, "README.md lost its DuckDB examples"
    return [q.replace("outputs/demo/generate", out) for q in queries]


@pytest.fixture(scope="module")
def trained(head, tmp_path_factory) -> str:
    """prepare_data then train, both submitted as jobs; returns the exported checkpoint path.
    Paths are absolute: a job's relative path would land in its temporary working dir."""
    root = tmp_path_factory.mktemp("e2e")
    data, runs = root / "data", root / "runs"
    submit(head, "python", "-m", "jobs.prepare_data", "--out", str(data), "--count", "200", "--size", "64",
           "--workers", "1", timeout=300)  # fmt: skip
    assert (data / "metadata.jsonl").is_file()
    logs = submit(head, "python", "-m", "jobs.train", "--smoke-test", "--data", str(data),
                  "--storage-path", str(runs), "--name", "e2e", timeout=900)  # fmt: skip
    export = runs / "e2e-smoke" / "export"  # --smoke-test appends -smoke to the run name
    assert f"exported checkpoint: {export}" in logs
    return str(export)


def test_train_then_generate_then_query(head, trained, tmp_path):
    from model.checkpoint import checkpoint_digest

    out = str(tmp_path / "gen")
    submit(head, "python", "-m", "jobs.generate", "--checkpoint", trained, "--output", out,
           "--num-seeds", "40", "--seed-start", "1000", "--shard-size", "16", "--batch-size", "8",
           "--steps", "5", "--max-actors", "1", timeout=600)  # fmt: skip

    manifest = f"'{out}/manifest/*.parquet'"
    rows = duckdb.sql(f"SELECT count(*), count(DISTINCT seed), min(seed), max(seed) FROM {manifest}").fetchall()
    assert rows == [(40, 40, 1000, 1039)]
    parts = sorted(p.name for p in Path(out, "manifest").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # 16 + 16 + 8 seeds
    digests = duckdb.sql(f"SELECT DISTINCT model_digest FROM {manifest}").fetchall()
    assert digests == [(checkpoint_digest(trained),)]
    assert duckdb.sql(f"SELECT count(*) FROM {manifest} WHERE length(trim(caption)) = 0").fetchall() == [(0,)]

    # The README's queries, checked against the same numbers computed in Python.
    captions = [c for (c,) in duckdb.sql(f"SELECT caption FROM {manifest}").fetchall()]
    words, subjects, lowest, joined = (duckdb.sql(q).fetchall() for q in readme_queries(out))
    counts = Counter(w for c in captions for w in c.lower().split(" "))
    assert words == sorted(words, key=lambda r: -r[1]) and words[0][1] == max(counts.values())
    assert all(counts[w] == n for w, n in words)
    for subject, n, _ in subjects:
        pattern = {"house": r"\b(house|cottage)\b"}.get(subject, rf"\b{subject}\b")
        assert n == sum(bool(re.search(pattern, c)) for c in captions), subject
    alignments = sorted(a for (a,) in duckdb.sql(f"SELECT alignment FROM {manifest}").fetchall())
    assert [a for _, a, _, _ in lowest] == pytest.approx([round(a, 3) for a in alignments[:5]], abs=1e-3)
    assert [seed for seed, _, _ in joined] == list(range(1000, 1005))
    assert all(Path(png).is_file() for _, _, png in joined)
