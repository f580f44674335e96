"""pipeline/generation/lease.py on a local folder and on moto's S3 server: one holder at a time,
live holders refused by name, stale ones (expired heartbeat, dead process) taken over, a lost
lease noticed by its old holder and by its actors' fence."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from pipeline import storage
from pipeline.generation import lease
from pipeline.generation.lease import Lease, LeaseHeld, LeaseLost


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_server")
    return f"s3://inkseed-test/lease-{request.node.name.replace('[', '-').rstrip(']')}"


def forge(out: str, **fields) -> None:
    """Write a lease as another holder would have (the content format of Lease._content)."""
    content = {"run_id": "other-run", "token": "t-other", "host": "elsewhere", "host_key": "elsewhere/x",
               "pid": 1, "pid_started": 1.0, "heartbeat_at": time.time(), "ttl_s": 60.0, **fields}  # fmt: skip
    storage.write_bytes(lease.lease_uri(out), json.dumps(content).encode())


def test_one_holder_then_the_next(out):
    first = Lease(out, ttl_s=30)
    assert first.acquire() is None
    first.set_run_id("run-a")
    with pytest.raises(LeaseHeld, match=r"being written by run run-a \(pid \d+ on .*lease .*lease.json"):
        Lease(out, ttl_s=30).acquire()
    first.release()
    assert not storage.exists(lease.lease_uri(out)), "release deletes the lease"
    second = Lease(out, ttl_s=30)
    assert second.acquire() is None
    second.release()


def test_concurrent_acquirers_get_one_lease(out):
    storage.check_writable(out)
    results: list[str] = []
    winners: list[Lease] = []

    def attempt() -> None:
        held = Lease(out, ttl_s=30)
        try:
            held.acquire()
            winners.append(held)
            results.append("held")
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["held"] + ["refused"] * 5
    assert lease.read(out)["token"] == winners[0].token
    winners[0].release()


def test_a_live_lease_of_another_host_is_refused(out):
    forge(out, heartbeat_at=time.time() - 5)
    with pytest.raises(
        LeaseHeld, match=r"run other-run \(pid 1 on elsewhere, heartbeat 5 s ago\).*expires 60 s"
    ):
        Lease(out).acquire()
    assert json.loads(storage.read_bytes(lease.lease_uri(out)))["token"] == "t-other", "left as it was"


def test_an_expired_heartbeat_is_taken_over(out):
    forge(out, heartbeat_at=time.time() - 120)
    held = Lease(out)
    assert "heartbeat is 120 s old (ttl 60 s)" in held.acquire()
    assert lease.read(out)["token"] == held.token
    held.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(out):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    forge(out, host_key=lease._host_key(), pid=gone.pid, pid_started=123.0)  # heartbeat fresh
    held = Lease(out)
    assert f"its process {gone.pid} on this host has exited" in held.acquire()
    held.release()


def test_an_unreadable_lease_is_taken_over(out):
    storage.write_bytes(lease.lease_uri(out), b'{"run_id": "cut-off')
    held = Lease(out)
    assert "unreadable" in held.acquire()
    held.release()


def test_heartbeat_renews_and_a_taken_lease_is_lost(out):
    held = Lease(out, ttl_s=1.0)  # beats every 0.25 s
    held.acquire()
    held.set_run_id("run-a")
    first = lease.read(out)["heartbeat_at"]
    time.sleep(1.5)
    held.check()  # still held: the heartbeat kept it alive past its ttl
    assert lease.read(out)["heartbeat_at"] > first
    lease.still_held(out, held.token)
    forge(out, run_id="run-b", token="t-b")  # as if this run had been paused past its ttl
    deadline = time.monotonic() + 10
    while held.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseLost, match=r"lost its lease.*taken over; it is now held by run run-b"):
        held.check()
    with pytest.raises(LeaseLost, match="no longer holds the lease"):
        lease.still_held(out, held.token)
    held.release()
    assert lease.read(out)["token"] == "t-b", "release never deletes another holder's lease"


def test_a_fresh_check_sees_a_takeover_before_the_next_heartbeat(out):
    held = Lease(out, ttl_s=600)  # its heartbeat would not notice for 150 s
    held.acquire()
    held.check(fresh=True)
    forge(out, run_id="run-b", token="t-b")
    held.check()  # the last heartbeat still vouches for it ...
    with pytest.raises(LeaseLost, match="now held by run run-b"):
        held.check(fresh=True)  # ... a fresh read, as before each part is written, does not
    held.release()
