"""Fault injection for mass generation: SIGKILL the driver or a model actor at random moments of a
`python -m jobs.generate` run, N times, then let the run finish and verify it. It prints numbers
(tests/pipeline/generation/test_faults.py runs a small version):

    python -m pipeline.generation.chaos                                # 8 kills, 600 seeds, tiny model
    python -m pipeline.generation.chaos --kills 20 --num-seeds 5000 --seed 3

Each round starts the same command again if no driver is running (a rerun resumes), waits a
random time, then kills either the driver (the whole job: the next round's rerun must take over
its lease and resume) or one SampleBatch actor of this benchmark's own Ray cluster (Ray restarts
it and retries its tasks). Kills land anywhere: while the driver starts, holds the lease before
run.json exists, generates, or writes a part. Then the last driver is waited for (or, if it was
killed, the command runs once more without kills), and `--verify` checks every part and image. Prints the kills survived (a kill is survived when the
driver after it did not fail) and the seeds lost, duplicated and mismatched: all 0 when
exactly-once holds.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COUNTS = re.compile(r"seeds: expected (\d+), lost (\d+), duplicated (\d+), mismatched (\d+)")


@dataclass
class FaultReport:
    driver_kills: int = 0
    actor_kills: int = 0
    survived: int = 0
    failures: list[str] = field(default_factory=list)  # stderr tails of drivers that failed
    final_ok: bool = False
    expected: int = 0
    lost: int = -1
    duplicated: int = -1
    mismatched: int = -1

    def lines(self) -> list[str]:
        kills = self.driver_kills + self.actor_kills
        return [
            f"kills: {kills} ({self.driver_kills} driver, {self.actor_kills} actor), survived {self.survived}",
            f"final run: {'ok' if self.final_ok else 'FAILED'}",
            f"seeds: expected {self.expected}, lost {self.lost}, duplicated {self.duplicated}, "
            f"mismatched {self.mismatched}",
        ] + [f"failure: {f}" for f in self.failures]


def actor_pids(raylet_pid: int) -> list[int]:
    """PIDs of the SampleBatch actors that this cluster's raylet started (never anyone else's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet_pid and "SampleBatch" in title:
            pids.append(int(entry.name))
    return pids


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else "(no output)"


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "jobs.generate", *args],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip


def _ended(job: subprocess.Popen, log: Path, report: FaultReport) -> bool:
    """Whether the driver is gone; a failure of its own (not our SIGKILL) is recorded."""
    if job.poll() is None:
        return False
    if job.returncode not in (0, -signal.SIGKILL):
        report.failures.append(_last_line(log.read_text(errors="replace")))
    return True


def _wait(job: subprocess.Popen, seconds: float, until=lambda: False) -> None:
    """Wait up to `seconds` while the driver runs, or until `until()` is true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and job.poll() is None and not until():
        time.sleep(0.05)


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`python -m jobs.generate ARGS` to its end; a driver that hangs past `timeout` counts as failed."""
    try:
        return subprocess.run([sys.executable, "-m", "jobs.generate", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 1, "", f"did not finish within {timeout:g} s")


def run_fault_injection(
    args: list[str], *, kills: int, ray_address: str, raylet_pid: int, seed: int = 0,
    max_delay: float = 12.0, actor_share: float = 0.5, workdir: Path, timeout: float = 1200.0,
) -> FaultReport:  # fmt: skip
    """`args` are jobs.generate's flags (with --output); the drivers join `ray_address`. A kill
    is an actor's with probability `actor_share` (once the driver has actors), else the driver's.
    `timeout` bounds each wait for a driver, so a hung cluster ends the run as a failure."""
    rng, report = random.Random(seed), FaultReport()
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    log = workdir / "driver.log"
    job: subprocess.Popen | None = None
    for _ in range(kills):
        if job is None or _ended(job, log, report):
            job = _start(args, env, log)
        at_actor = rng.random() < actor_share
        if at_actor:  # an actor exists only once the driver has started its pool
            _wait(job, timeout, until=lambda: bool(actor_pids(raylet_pid)))
        _wait(job, rng.uniform(0.5, max_delay))
        if _ended(job, log, report):  # it finished (or failed) before the kill: start the next round
            continue
        actors = actor_pids(raylet_pid) if at_actor else []
        if actors:
            os.kill(rng.choice(actors), signal.SIGKILL)
            report.actor_kills += 1
        else:
            job.kill()
            job.wait()
            report.driver_kills += 1
    if job is not None:
        _wait(job, timeout)
        if job.poll() is None:
            job.kill()
            report.failures.append(f"a driver did not finish within {timeout:g} s")
        job.wait()
        _ended(job, log, report)
    report.survived = report.driver_kills + report.actor_kills - len(report.failures)
    report.final_ok = job is not None and job.returncode == 0  # the last driver finished the run
    if not report.final_ok:  # it was killed: one more rerun, without kills, must finish it
        final = _run(args, env, timeout)
        report.final_ok = final.returncode == 0
        if not report.final_ok:
            report.failures.append(_last_line(final.stderr))
    found = COUNTS.search(_run([*args, "--verify"], env, timeout).stdout)
    if found:
        report.expected, report.lost, report.duplicated, report.mismatched = map(int, found.groups())
    return report


def make_checkpoint(path: Path) -> None:
    """An untrained tiny checkpoint (speed and exactly-once do not depend on training)."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.networks import JointModel
    from model.tokenizer import CaptionTokenizer

    torch.manual_seed(0)
    tok = CaptionTokenizer.train(["an engraving of a windmill on the hills", "a print of a ship at sea"])
    save_checkpoint(path, JointModel(get_preset("tiny"), tok.vocab_size), tok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--num-seeds", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="DDIM steps: few, so a run takes seconds")
    parser.add_argument("--checkpoint", default=None, help="default: an untrained tiny one")
    parser.add_argument("--max-delay", type=float, default=12.0, help="seconds at most before a kill")
    parser.add_argument("--actor-share", type=float, default=0.5, help="share of the kills aimed at an actor")
    parser.add_argument("--seed", type=int, default=0, help="the kills' random schedule")
    opts = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="inkseed-faults-") as tmp:
        work = Path(tmp)
        ckpt = opts.checkpoint or str(work / "ckpt")
        if opts.checkpoint is None:
            make_checkpoint(Path(ckpt))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
            args = ["--checkpoint", ckpt, "--output", str(work / "out"), "--num-seeds", str(opts.num_seeds),
                    "--shard-size", str(opts.shard_size), "--batch-size", str(opts.batch_size),
                    "--steps", str(opts.steps), "--max-actors", "1"]  # fmt: skip
            report = run_fault_injection(
                args, kills=opts.kills, ray_address=ray.get_runtime_context().gcs_address,
                raylet_pid=raylet, seed=opts.seed, max_delay=opts.max_delay,
                actor_share=opts.actor_share, workdir=work,
            )  # fmt: skip
        finally:
            ray.shutdown()
    print("\n".join(report.lines()))
    ok = (
        report.final_ok and not report.failures and report.lost == report.duplicated == report.mismatched == 0
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
