"""Job command lines built from the config dataclasses with tyro.

Every field of a job's config is a flag (`batch_size` -> `--batch-size`), its type checks the
value (`Literal` fields list their choices), and the comment above the field is its `--help`
text, so the help never drifts from the code. Precedence: flags > a YAML file (jobs.train's
`--config`) or a preset like `--smoke-test` > the dataclass defaults: the lower layers only
change the defaults tyro starts from.
"""

from __future__ import annotations

import sys
from typing import TypeVar

import tyro

A = TypeVar("A")


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
