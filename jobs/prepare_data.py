"""Render a dataset: the embedded procedural engravings (pipeline/data/engrave.py) or OpenMoji line art.

    python -m jobs.prepare_data --out data/engravings --count 20000 --size 128 --seed 0

writes data/engravings/images/NNNNNN.png, metadata.jsonl and contact_sheet.png. The same
arguments give the same bytes. --out may be an s3:// URI. On a cluster:

    ray job submit --working-dir . -- python -m jobs.prepare_data --out s3://bucket/engravings --count 20000

A failure ends with one line, `error: ...`, naming the file or URI and what to do (`--debug`
shows the traceback instead).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from jobs.cli import argv_or_sys, parse, run_job
from pipeline import storage
from pipeline.data import engrave, openmoji


@dataclass
class PrepareConfig:
    """Everything `jobs.prepare_data` needs (each field's comment is its --help)."""

    # Output folder or s3:// URI.
    out: str = "data/engravings"
    # Images to render; 20K is enough for the base model to learn every attribute. For openmoji
    # the first N drawings; None = 20,000 engravings, or every drawing.
    count: int | None = None
    # Image side in px, 64..512; training resizes as needed.
    size: int = 128
    # Dataset identity of the procedural source: sample i depends only on (seed, i).
    seed: int = 0
    # Rendering processes (default: one per CPU of the machine).
    workers: int = field(default_factory=engrave.default_workers)
    # The dataset: the procedural engravings, or OpenMoji's real line art.
    source: Literal["procedural", "openmoji"] = "procedural"
    # The openmoji package folder; None: $INKSEED_OPENMOJI, then the fetch cache.
    openmoji_dir: str | None = None
    # On failure, show the full traceback instead of the one-line error.
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    cfg = parse(PrepareConfig, argv_or_sys(argv), PrepareConfig(), __doc__.split("\n")[0])
    if cfg.count is None and cfg.source == "procedural":
        cfg.count = 20_000
    try:
        engrave.check_size(cfg.size)
        if cfg.source == "openmoji":
            openmoji.find_source(cfg.openmoji_dir)  # missing: fail here, with the fetch command
    except ValueError as e:
        _refuse(str(e))
    if (cfg.count is not None and cfg.count < 1) or cfg.workers < 1:
        _refuse("--count and --workers must be at least 1")
    return cfg


def _refuse(message: str) -> None:
    """A bad argument: say why on stderr and exit 2, as a command-line parser does."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(cfg: PrepareConfig) -> None:
    storage.check_writable(cfg.out)
    start = time.perf_counter()
    if cfg.source == "openmoji":
        count = openmoji.render_openmoji(
            cfg.out, cfg.size, cfg.openmoji_dir, limit=cfg.count, workers=cfg.workers
        )
        what = "OpenMoji drawings"
    else:
        engrave.render_dataset(cfg.out, cfg.count, cfg.size, cfg.seed, workers=cfg.workers)
        count, what = cfg.count, "engravings"
    elapsed = time.perf_counter() - start
    print(
        f"wrote {count} {what} of {cfg.size}px to {cfg.out} in {elapsed:.1f}s "
        f"({count / elapsed:.0f} images/s, {cfg.workers} workers); "
        f"contact sheet: {storage.join(cfg.out, 'contact_sheet.png')}"
    )


if __name__ == "__main__":
    config = run_job(parse_args)
    run_job(lambda: main(config))
