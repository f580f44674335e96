"""Injected worker failures, for the resume tests only (not a TrainConfig field, not a flag).

The driver reads `INKSEED_TRAIN_FAIL_AFTER` from its environment, e.g. "epoch=1,prior_epoch=2,
sharpen_step=4", and hands it to the workers in their loop config. A worker then raises right
after the checkpoint of that epoch or step is registered, unless the attempt resumed from a
checkpoint of that phase or a later one: so one run is killed once in each phase it names, and
each retry continues from the checkpoint the failure left behind.
"""

from __future__ import annotations

import os

import ray.train

from pipeline.training.state import PHASES, Phase

FAIL_AFTER_ENV = "INKSEED_TRAIN_FAIL_AFTER"
COUNTERS: dict[str, Phase] = {"epoch": "autoencoder", "prior_epoch": "prior", "sharpen_step": "sharpen"}


def injected_failures() -> dict[str, int]:
    """The driver's INKSEED_TRAIN_FAIL_AFTER as {counter: value} ({} when unset)."""
    text = os.environ.get(FAIL_AFTER_ENV, "").strip()
    failures = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in COUNTERS or not value.strip().isdigit():
            raise ValueError(f"{FAIL_AFTER_ENV}={text!r}: expected NAME=INT items, NAME one of {sorted(COUNTERS)}")
        failures[name] = int(value)
    return failures


def maybe_fail(failures: dict[str, int], counter: str, value: int, resumed_phase: Phase | None) -> None:
    """Raise the injected failure of `counter` at `value` (module docstring)."""
    if failures.get(counter) != value:
        return
    if resumed_phase is not None and PHASES.index(resumed_phase) >= PHASES.index(COUNTERS[counter]):
        return
    ray.train.get_all_reported_checkpoints()  # waits until the checkpoint just reported is registered
    raise RuntimeError(f"injected failure after {counter} {value} ({FAIL_AFTER_ENV})")
