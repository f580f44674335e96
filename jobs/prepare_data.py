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
from pipeline.data import engrave


@dataclass
class PrepareConfig:
    out: str = "data/engravings"  # local folder or s3:// URI
    count: int = 20000  # images; 20K is enough for the base model to learn every attribute
    size: int = 128  # px, 64..512; training resizes as needed
    seed: int = 0  # dataset identity: sample i depends only on (seed, i)
    workers: int = field(default_factory=engrave.default_workers)  # rendering processes


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    d = PrepareConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=d.out, help="output folder or s3:// URI")
    ap.add_argument("--count", type=int, default=d.count, help="number of images")
    ap.add_argument("--size", type=int, default=d.size, help="image size in px (64..512)")
    ap.add_argument("--seed", type=int, default=d.seed, help="dataset seed")
    ap.add_argument("--workers", type=int, default=d.workers, help="rendering processes")
    args = ap.parse_args(argv)
    try:
        engrave.check_size(args.size)
    except ValueError as e:
        ap.error(str(e))
    if args.count < 1 or args.workers < 1:
        ap.error("--count and --workers must be at least 1")
    return PrepareConfig(**vars(args))


def main(cfg: PrepareConfig) -> None:
    storage.check_writable(cfg.out)
    start = time.perf_counter()
    engrave.render_dataset(cfg.out, cfg.count, cfg.size, cfg.seed, workers=cfg.workers)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {cfg.count} engravings of {cfg.size}px to {cfg.out} in {elapsed:.1f}s "
        f"({cfg.count / elapsed:.0f} images/s, {cfg.workers} workers); "
        f"contact sheet: {storage.join(cfg.out, 'contact_sheet.png')}"
    )


if __name__ == "__main__":
    main(parse_args())
