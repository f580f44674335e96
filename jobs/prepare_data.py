"""Render the embedded procedural engraving dataset (see pipeline/data/engrave.py).

    python -m jobs.prepare_data --out data/engravings --count 20000 --size 128 --seed 0

writes data/engravings/images/NNNNNN.png, metadata.jsonl and contact_sheet.png. The same
arguments give the same bytes. --out may be an s3:// URI. On a cluster:

    ray job submit --working-dir . -- python -m jobs.prepare_data --out s3://bucket/engravings --count 20000
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.data import engrave, openmoji


@dataclass
class PrepareConfig:
    out: str = "data/engravings"  # local folder or s3:// URI
    # images; 20K is enough for the base model to learn every attribute (openmoji: the first N, None = all)
    count: int | None = 20000
    size: int = 128  # px, 64..512; training resizes as needed
    seed: int = 0  # dataset identity: sample i depends only on (seed, i)
    workers: int = field(default_factory=engrave.default_workers)  # rendering processes
    source: str = "procedural"  # "procedural" engravings or "openmoji" line art
    openmoji_dir: str | None = None  # package folder; None: $INKSEED_OPENMOJI, then the fetch cache


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    d = PrepareConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=d.out, help="output folder or s3:// URI")
    ap.add_argument("--count", type=int, default=None, help=f"number of images ({d.count}; openmoji: all)")
    ap.add_argument("--size", type=int, default=d.size, help="image size in px (64..512)")
    ap.add_argument("--seed", type=int, default=d.seed, help="dataset seed")
    ap.add_argument("--workers", type=int, default=d.workers, help="rendering processes")
    ap.add_argument("--source", choices=("procedural", "openmoji"), default=d.source, help="dataset")
    ap.add_argument("--openmoji-dir", default=d.openmoji_dir, help="openmoji package folder")
    args = ap.parse_args(argv)
    if args.count is None and args.source == "procedural":
        args.count = d.count  # openmoji keeps None: every drawing
    try:
        engrave.check_size(args.size)
        if args.source == "openmoji":
            openmoji.find_source(args.openmoji_dir)  # missing: fail here, with the fetch command
    except ValueError as e:
        ap.error(str(e))
    if (args.count is not None and args.count < 1) or args.workers < 1:
        ap.error("--count and --workers must be at least 1")
    return PrepareConfig(**vars(args))


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
    main(parse_args())
