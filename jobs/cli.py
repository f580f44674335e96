"""Job command lines built from the config dataclasses with tyro.

Every field of a job's config is a flag (`batch_size` -> `--batch-size`), its type checks the
value (`Literal` fields list their choices), and the comment above the field is its `--help`
text, so the help never drifts from the code. Precedence: flags > a YAML file (jobs.train's
`--config`) or a preset like `--smoke-test` > the dataclass defaults: the lower layers only
change the defaults tyro starts from.

`run_job` is how every job ends a failure: one line, `error: ...`, naming the file or URI and
saying what to do (`--debug` shows the traceback instead).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import tyro

A = TypeVar("A")
R = TypeVar("R")


def argv_or_sys(argv: list[str] | None) -> list[str]:
    """The arguments to parse: the given list, or the process's own."""
    return sys.argv[1:] if argv is None else list(argv)


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in argv (read before tyro parses, because it
    chooses tyro's defaults), or None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def parse(args_type: type[A], argv: list[str], default: A, description: str) -> A:
    """tyro.cli over `args_type`, starting from `default`."""
    return tyro.cli(args_type, args=argv, default=default, description=description)


def run_job(job: Callable[[], R], argv: list[str] | None = None) -> R:
    """job(), ending a failure with one line on stderr, `error: ...`, naming the file or URI and
    what to do, and exit status 1; with `--debug` in argv the traceback instead. tyro's own exits
    (--help, a bad flag) pass through."""
    debug = "--debug" in argv_or_sys(argv)
    try:
        return job()
    except BaseException as e:
        if debug or isinstance(e, SystemExit):
            raise
        sys.exit(f"error: {one_line(e)}")


def one_line(e: BaseException) -> str:
    """The message after `error: ` for any exception. A Ray Train failure is described by the
    error a worker (the lowest rank) or the controller raised, which Ray keeps as the exception
    itself; inkseed's own errors already name their file and what to do; the rest go through
    jobs.generate's rules (pipeline/generation/errors.py: disk full, permissions, interrupts)."""
    from model.checkpoint import CheckpointError
    from pipeline.generation.errors import one_line as generation_one_line
    from pipeline.training.config import TrainError

    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        e = failures[min(failures)]
    elif isinstance(getattr(e, "controller_failure", None), BaseException):
        e = e.controller_failure
    if isinstance(e, (TrainError, CheckpointError, FloatingPointError)):
        return " ".join(str(e).split())
    return generation_one_line(e)
