"""The lease on a generation output: one writer at a time on OUT, locally and on S3.

A generation run (or `--repair`) holds `OUT/lease.json` while it writes: who holds it (run_id,
a token unique to this process's hold, host, pid) and a heartbeat that a background thread
renews every ttl/4 seconds. Every change goes through `storage.compare_and_swap` (flock locally,
conditional PUT/DELETE on S3), so two runs can never both believe they hold it.

- A second run, and `--overwrite`, refuse while the lease is live, naming the holder.
- A lease is stale, and the next run takes it over, when its heartbeat is older than its ttl (the
  holder is dead, hung or cut off), or at once when its holder ran on this host and its process
  is gone (a killed job, rerun right away). Clocks of the hosts must agree within the ttl.
- A holder that finds its lease taken (it was paused past its ttl) or cannot renew it for a ttl
  marks it lost: `check()` raises, so the driver writes no part and the actors write no PNG
  after that (they call `still_held` before each batch's writes).
- The holder deletes it when the run ends, however it ends (a SIGKILL leaves it: stale, above).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import psutil

from pipeline import storage
from pipeline.generation.config import GenerateError

LEASE_NAME = "lease.json"


class LeaseHeld(GenerateError):
    """Another live run holds the output's lease."""


class LeaseLost(GenerateError):
    """This run's lease was taken over or could not be renewed: it must stop writing."""


def lease_uri(out: str) -> str:
    return storage.join(out, LEASE_NAME)


def _host_key() -> str:
    """This host as seen by pids: hostname, boot id and pid namespace (containers sharing a
    hostname or a kernel still differ), so a pid is only judged on the host it belongs to."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(open(path).read().strip())
        except OSError:
            pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "/".join(parts)


def _process_started(pid: int) -> float | None:
    """When process `pid` started (None when it does not exist or is a zombie)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(proc.create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):  # ValueError: pid <= 0
        return None


def parse(data: bytes | None) -> dict[str, Any] | None:
    """A lease's content; {} for an unreadable one (a holder killed while rewriting it)."""
    if data is None:
        return None
    try:
        lease = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return {}
    return lease if isinstance(lease, dict) and "token" in lease else {}


def stale_reason(lease: dict[str, Any], now: float | None = None) -> str | None:
    """Why a lease no longer protects anything (None while its holder is alive)."""
    if not lease:
        return "the lease file is unreadable"
    now = time.time() if now is None else now
    age = now - float(lease.get("heartbeat_at", 0))
    if age > float(lease.get("ttl_s", 0)):
        return f"its heartbeat is {age:.0f} s old (ttl {float(lease.get('ttl_s', 0)):g} s)"
    pid = int(lease.get("pid") or 0)
    if lease.get("host_key") == _host_key() and _process_started(pid) != lease.get("pid_started"):
        return f"its process {pid} on this host has exited"  # (or its pid now names another process)
    return None


def describe(lease: dict[str, Any], now: float | None = None) -> str:
    """The holder, for messages: run, process, host, heartbeat age."""
    now = time.time() if now is None else now
    run = lease.get("run_id") or "(starting)"
    age = now - float(lease.get("heartbeat_at", now))
    return f"run {run} (pid {lease.get('pid')} on {lease.get('host')}, heartbeat {age:.0f} s ago)"


def read(out: str) -> dict[str, Any] | None:
    """The current lease of `out` (None when nobody holds it), read consistently."""
    if not storage.exists(lease_uri(out)):  # (and a read never creates OUT)
        return None
    seen: list[bytes | None] = []
    storage.compare_and_swap(lease_uri(out), lambda data: seen.append(data) or storage.KEEP)
    return parse(seen[-1])


def still_held(out: str, token: str) -> None:
    """Raise LeaseLost unless the lease of `out` is still the hold `token` (the actors' fence)."""
    lease = read(out)
    if not lease or lease.get("token") != token:
        holder = describe(lease) if lease else "nobody"
        raise LeaseLost(
            f"{lease_uri(out)}: this run no longer holds the lease (now: {holder}); it stopped writing"
        )


class Lease:
    """A held lease on OUT: `acquire()`, then `check()` before each write, `release()` at the end
    (or use it as a context manager). The heartbeat runs in a daemon thread."""

    def __init__(self, out: str, ttl_s: float = 60.0) -> None:
        self.out, self.uri, self.ttl_s = out, lease_uri(out), float(ttl_s)
        self.token = uuid.uuid4().hex
        self.run_id: str | None = None
        self.lost: str | None = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = time.monotonic()

    def _content(self) -> bytes:
        pid = os.getpid()
        return json.dumps(
            {
                "run_id": self.run_id,
                "token": self.token,
                "host": socket.gethostname(),
                "host_key": _host_key(),
                "pid": pid,
                "pid_started": _process_started(pid),
                "heartbeat_at": time.time(),
                "ttl_s": self.ttl_s,
            },
            indent=1,
        ).encode()

    def acquire(self) -> str | None:
        """Take the lease, or raise LeaseHeld naming the live holder. Returns why a stale lease was
        taken over (None when there was none), for the run to print."""
        verdict: dict[str, Any] = {}

        def decide(data: bytes | None) -> bytes | storage._Verdict:
            lease = parse(data)
            verdict.clear()
            if lease is not None:
                reason = stale_reason(lease)
                if reason is None:
                    verdict["held"] = lease
                    return storage.KEEP
                verdict["took_over"] = f"{describe(lease) if lease else 'an unreadable lease'}: {reason}"
            return self._content()

        storage.compare_and_swap(self.uri, decide)
        if "held" in verdict:
            lease = verdict["held"]
            raise LeaseHeld(
                f"{self.out} is being written by {describe(lease)} (lease {self.uri}). Wait for it to end, "
                f"or stop it; if it died, its lease expires {float(lease['ttl_s']):g} s after its last heartbeat."
            )
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="inkseed-lease", daemon=True)
        self._thread.start()
        return verdict.get("took_over")

    def renew(self) -> None:
        """Rewrite the heartbeat (and run_id); mark the lease lost if someone else holds it now."""
        taken: list[dict[str, Any] | None] = []

        def decide(data: bytes | None) -> bytes | storage._Verdict:
            lease = parse(data)
            taken.clear()
            if not lease or lease.get("token") != self.token:
                taken.append(lease)
                return storage.KEEP
            return self._content()

        storage.compare_and_swap(self.uri, decide)
        if taken:
            holder = describe(taken[0]) if taken[0] else "nobody (the lease file was removed)"
            self.lost = f"the lease was taken over; it is now held by {holder}"
        else:
            self._renewed = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and self.lost is None:
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001  (a passing S3 error: retry on the next beat ...)
                if time.monotonic() - self._renewed > self.ttl_s * 0.75:  # ... until others may take it
                    self.lost = f"its heartbeat could not be renewed for {self.ttl_s * 0.75:g} s ({e})"

    def set_run_id(self, run_id: str) -> None:
        self.run_id = run_id
        self.renew()
        self.check()

    def check(self, fresh: bool = False) -> None:
        """Raise LeaseLost once the lease is lost (the run must stop writing); `fresh` also reads
        the lease now (before a part is written) instead of trusting the last heartbeat."""
        if fresh and self.lost is None:
            lease = read(self.out)
            if not lease or lease.get("token") != self.token:
                self.lost = (
                    f"it is now held by {describe(lease) if lease else 'nobody (the lease file was removed)'}"
                )
        if self.lost is None and time.monotonic() - self._renewed > self.ttl_s * 0.75:
            self.lost = f"its heartbeat was last renewed {time.monotonic() - self._renewed:.0f} s ago"
        if self.lost is not None:
            raise LeaseLost(
                f"{self.uri}: this run lost its lease on {self.out}: {self.lost}. It stopped writing."
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        mine = lambda data: storage.DELETE if (parse(data) or {}).get("token") == self.token else storage.KEEP  # noqa: E731
        try:
            storage.compare_and_swap(self.uri, mine)
        except storage.StorageError as e:  # the run's own outcome matters more; the lease expires
            print(
                f"inkseed: could not release {self.uri} ({e}); it expires in {self.ttl_s:g} s",
                file=sys.stderr,
            )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
