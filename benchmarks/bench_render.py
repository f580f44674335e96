"""Rendering speed of the procedural engravings, and optionally ingestion throughput.

    python benchmarks/bench_render.py                      # render speed at 64/128/256 px, one core
    python benchmarks/bench_render.py --ingest --count 2000 # plus read_dataset rows/s on local Ray

Speeds are per core: the loop runs in one process. On a shared machine the wall-clock rate
undercounts, so the rate per CPU second of this process is printed next to it.
Target (issue 2): >= 200 images/s per core at 128 px, PNG encoding included.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pipeline.data import engrave


def bench_render(size: int, count: int) -> None:
    engrave.make_sample(0, 0, size)  # textures are built once per size; keep that out of the timing
    rates = {}
    for label, encode in (("render", False), ("render+png", True)):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            image = engrave.make_sample(0, i, size)[2]
            if encode:
                engrave.png_bytes(image)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rates[label] = (count / wall, count / cpu)
    print(
        f"{size:4d} px: "
        + "  ".join(f"{k} {w:6.0f} img/s wall, {c:6.0f} img/s per CPU-s" for k, (w, c) in rates.items())
    )


def bench_ingest(count: int, size: int) -> None:
    import ray

    from pipeline.data.ingest import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        engrave.render_dataset(tmp, count, size, seed=0, workers=engrave.default_workers())
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            start = time.perf_counter()
            ds, stats = load_dataset(tmp, image_size=size)
            rows = sum(len(b["caption"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))
            elapsed = time.perf_counter() - start
        finally:
            ray.shutdown()
    print(
        f"ingest {size} px: {rows} rows in {elapsed:.1f}s = {rows / elapsed:.0f} rows/s ({stats.summary(tmp)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--count", type=int, default=500, help="images per measurement")
    ap.add_argument("--ingest", action="store_true", help="also measure read_dataset throughput")
    args = ap.parse_args()
    for size in args.sizes:
        bench_render(size, args.count)
    if args.ingest:
        bench_ingest(args.count, 128)


if __name__ == "__main__":
    main()
