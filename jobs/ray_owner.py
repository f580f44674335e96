"""Shared by the jobs: run a job function and leave Ray as it was found."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import ray

C = TypeVar("C")
R = TypeVar("R")


def run_owning_ray(run: Callable[[C], R], cfg: C) -> R:
    """run(cfg), then shut Ray down if it was not running before. The job function itself starts
    Ray once its inputs are checked: under `ray job submit` it joins the cluster through
    RAY_ADDRESS, otherwise it starts a local one (which this shuts down again)."""
    started_here = not ray.is_initialized()
    try:
        return run(cfg)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
