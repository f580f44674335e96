"""pipeline/generation/run.py + pipeline/generation/manifest.py + jobs/generate.py on a real local Ray with a tiny
(untrained, scrambled) checkpoint: the manifest read back with DuckDB, determinism across batch
sizes and actor counts, exactly-once after a killed driver, refusal of a different rerun,
bad input, and s3:// output on moto's server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.checkpoint import save_checkpoint
from pipeline import storage
from pipeline.generation import manifest
from pipeline.generation.chaos import actor_pids
from pipeline.generation.config import GenerateConfig, GenerateError
from pipeline.generation.run import run_generation
from pipeline.generation.sampler import _assign_seeds, resolve_resources
from pipeline.generation.verify import verify_output

from builders import scrambled_tiny

REPO = Path(__file__).resolve().parents[3]
CAPTIONS = [
    "an engraving of a windmill on the hills, on the left, under a crescent moon at night, with three birds",
    "at dusk, a print of a sailing ship at sea, in the middle",
    "an etching of an oak tree in a field, to the right, by day",
    "a print of a church in the town, on the right, beneath the clouds, with a bird",
]
# Small and fast: 5 DDIM steps of the tiny preset, shards of 50 so a few hundred seeds make several parts.
FAST = {"steps": 5, "shard_size": 50, "num_cpus": 0.5}

# The analyst queries README.md shows, with OUT substituted; they must run as written.
ANALYST_QUERIES = {
    "words": """
        SELECT word, count(*) AS n
        FROM (SELECT unnest(string_split(lower(caption), ' ')) AS word FROM 'OUT/manifest/*.parquet')
        GROUP BY word ORDER BY n DESC LIMIT 10""",
    "lowest_alignment": """
        SELECT seed, alignment, caption, image_path
        FROM 'OUT/manifest/*.parquet' ORDER BY alignment ASC LIMIT 5""",
    "images": """
        SELECT m.seed, m.caption, f.file
        FROM 'OUT/manifest/*.parquet' AS m
        JOIN glob('OUT/images/*/*.png') AS f ON f.file = 'OUT/' || m.image_path
        ORDER BY m.seed""",
}


def make_checkpoint(path: Path, seed: int) -> str:
    """An untrained tiny checkpoint, scrambled so captions and images vary with the seed."""
    return save_checkpoint(path, *scrambled_tiny(CAPTIONS, seed))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return str(path), make_checkpoint(path, seed=0)


@pytest.fixture(scope="module")
def run300(ckpt, ray_local, tmp_path_factory) -> tuple[GenerateConfig, dict]:
    """300 seeds from 1000, batches of 32 over up to 2 actors: 6 manifest parts."""
    out = str(tmp_path_factory.mktemp("gen") / "run300")
    cfg = GenerateConfig(
        checkpoint=ckpt[0], output=out, seed_start=1000, num_seeds=300, batch_size=32, max_actors=2, **FAST
    )
    return cfg, run_generation(cfg)


def read_manifest(out: str):
    """The whole manifest as a pyarrow table, read with DuckDB (local) or pyarrow (s3://)."""
    if storage.is_s3(out):
        fs, root = storage.filesystem(out)
        return pq.read_table(f"{root}/manifest", filesystem=fs)
    return duckdb.sql(f"SELECT * FROM '{out}/manifest/*.parquet' ORDER BY seed").to_arrow_table()


def one_row(sql: str) -> tuple:
    (row,) = duckdb.sql(sql).fetchall()
    return row


def png_pixels(out: str, rel: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(out, rel)))))


def test_assign_seeds_covers_each_pending_seed_once():
    """Slots of pending shards 1 and 4 of a 230-seed range (shards of 50, the last one short)."""
    plan = manifest.range_plan(seed_start=100, num_seeds=230, shard_size=50)
    out = _assign_seeds({"id": np.arange(100)}, plan, pending=np.array([1, 4]))
    assert out["seed"].tolist() == list(range(150, 200)) + list(range(300, 330))
    assert out["shard"].tolist() == [1] * 50 + [4] * 30
    picked = manifest.SeedPlan(count=3, shard_size=2, explicit=np.array([9, 4, 7]))
    out = _assign_seeds({"id": np.arange(4)}, picked, pending=np.array([0, 1]))
    assert (out["seed"].tolist(), out["shard"].tolist()) == ([9, 4, 7], [0, 0, 1])


def test_manifest_complete_and_images_match(run300, ckpt):
    cfg, summary = run300
    assert summary["manifest_rows"] == summary["seeds"] == summary["generated"] == 300
    count, distinct, lo, hi = one_row(
        f"SELECT count(*), count(DISTINCT seed), min(seed), max(seed) FROM '{cfg.output}/manifest/*.parquet'"
    )
    assert (count, distinct, lo, hi) == (300, 300, 1000, 1299)
    assert sorted(p.name for p in Path(cfg.output, "manifest").iterdir()) == [
        f"part-{i:05d}.parquet" for i in range(6)
    ]
    rows = read_manifest(cfg.output).to_pylist()
    for row in rows:
        data = Path(cfg.output, row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
        assert row["image_path"] == f"images/{(row['seed'] - 1000) // 50:05d}/{row['seed']}.png"
    assert {(r["width"], r["height"], r["model_digest"], r["run_id"]) for r in rows} == {
        (64, 64, ckpt[1], summary["run_id"])
    }
    assert len({r["caption"] for r in rows}) > 1, "the scrambled model should vary its captions with the seed"
    # Each part is sorted by seed and holds its shard's 50 seeds.
    part = pq.read_table(Path(cfg.output, "manifest", "part-00002.parquet"))
    assert part.schema == manifest.SCHEMA
    assert part["seed"].to_pylist() == list(range(1100, 1150))


def test_run_json_records_the_run(run300, ckpt):
    cfg, summary = run300
    info = json.loads(Path(cfg.output, "run.json").read_text())
    assert info["model_digest"] == ckpt[1]
    assert info["seeds"] == {"kind": "range", "seed_start": 1000, "num_seeds": 300}
    assert info["run_id"] == summary["run_id"]
    assert {"inkseed", "torch", "ray"} <= set(info["versions"])
    assert info["config"]["batch_size"] == 32


def test_analyst_queries_run_as_written(run300):
    out = run300[0].output
    results = {name: duckdb.sql(q.replace("OUT", out)).fetchall() for name, q in ANALYST_QUERIES.items()}
    assert results["words"] and all(n > 0 for _, n in results["words"])
    alignments = [a for _, a, _, _ in results["lowest_alignment"]]
    assert alignments == sorted(alignments) and len(alignments) == 5
    assert len(results["images"]) == 300, "every manifest row joins to its image file"


def test_rerun_of_a_complete_output_does_nothing(run300):
    cfg, first = run300
    again = run_generation(cfg)
    assert (again["generated"], again["manifest_rows"], again["run_id"]) == (0, 300, first["run_id"])


def test_determinism_across_batch_size_and_actors(run300, tmp_path):
    """The same seeds, shuffled into a seeds file, with batch 7 on one actor: same captions, same
    pixels within 1/255."""
    cfg, _ = run300
    seeds = np.random.default_rng(0).permutation(np.arange(1000, 1300))[:60]
    seeds_file = tmp_path / "seeds.txt"
    seeds_file.write_text("# picked seeds\n" + "\n".join(map(str, seeds)) + "\n\n")
    cfg2 = GenerateConfig(
        checkpoint=cfg.checkpoint,
        output=str(tmp_path / "picked"),
        seeds_file=str(seeds_file),
        batch_size=7,
        min_actors=1,
        max_actors=1,
        **{**FAST, "shard_size": 25},
    )
    assert run_generation(cfg2)["manifest_rows"] == 60
    first = {r["seed"]: r for r in read_manifest(cfg.output).to_pylist()}
    second = read_manifest(cfg2.output).to_pylist()
    assert sorted(r["seed"] for r in second) == sorted(seeds.tolist())
    for row in second:
        ref = first[row["seed"]]
        assert row["caption"] == ref["caption"]
        assert row["alignment"] == pytest.approx(ref["alignment"], abs=1e-3)
        a = png_pixels(cfg2.output, row["image_path"]).astype(int)
        b = png_pixels(cfg.output, ref["image_path"]).astype(int)
        assert np.abs(a - b).max() <= 1, f"seed {row['seed']}"
    # Shards of a seeds file follow file order: the first 25 lines are shard 0.
    assert {r["seed"] for r in second if r["shard"] == 0} == set(seeds[:25].tolist())


@pytest.mark.slow  # fault injection: a driver subprocess killed and rerun
def test_resume_after_killing_the_driver(ckpt, ray_local, tmp_path):
    """`python -m jobs.generate` on the test cluster, SIGKILLed once its first manifest part
    exists; rerunning the same settings finishes the rest with every seed exactly once."""
    out = tmp_path / "killed"
    args = ["--checkpoint", ckpt[0], "--output", str(out), "--num-seeds", "200", "--shard-size", "10"]
    args += ["--batch-size", "10", "--steps", "5", "--max-actors", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.generate", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300  # generous: the test machine is shared
        while not list(out.glob("manifest/part-*.parquet")):
            assert job.poll() is None, job.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no manifest part after 300 s"
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    done_before = set(manifest.part_shards(str(out)))
    assert 0 < len(done_before) < 20, "the kill should land midway"

    cfg = GenerateConfig(
        checkpoint=ckpt[0], output=str(out), num_seeds=200, shard_size=10, batch_size=16, steps=5
    )
    summary = run_generation(cfg)
    assert summary["generated"] == 200 - 10 * len(done_before)
    count, distinct = one_row(f"SELECT count(*), count(DISTINCT seed) FROM '{out}/manifest/*.parquet'")
    assert count == distinct == 200
    for row in read_manifest(str(out)).to_pylist():
        assert hashlib.sha256((out / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]


@pytest.mark.slow  # fault injection: an actor killed mid-run
def test_killed_worker_is_retried_exactly_once(ckpt, ray_local, tmp_path):
    """SIGKILL the generation actor once the first part is written: Ray restarts it and retries its
    tasks, and the manifest still holds every seed exactly once."""
    out = tmp_path / "worker-killed"
    raylet = ray_local._private.worker._global_node.all_processes["raylet"][0].process.pid
    killed: list[int] = []

    def kill_actor_after_first_part() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("manifest/part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in actor_pids(raylet):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_actor_after_first_part)
    killer.start()
    cfg = GenerateConfig(
        checkpoint=ckpt[0],
        output=str(out),
        num_seeds=200,
        shard_size=10,
        batch_size=10,
        steps=5,
        max_actors=1,
    )
    try:
        summary = run_generation(cfg)
    finally:
        killer.join()
    assert killed, "the actor should have been found and killed"
    assert summary["manifest_rows"] == summary["generated"] == 200
    assert one_row(f"SELECT count(*), count(DISTINCT seed) FROM '{out}/manifest/*.parquet'") == (200, 200)
    for row in read_manifest(str(out)).to_pylist():
        assert hashlib.sha256((out / row["image_path"]).read_bytes()).hexdigest() == row["image_sha256"]


def test_different_rerun_is_refused_unless_overwrite(run300, tmp_path):
    cfg, first = run300
    other = tmp_path / "other-ckpt"
    make_checkpoint(other, seed=1)
    with pytest.raises(GenerateError, match=r"different run \(model_digest.*--overwrite"):
        run_generation(GenerateConfig(**{**vars(cfg), "checkpoint": str(other)}))
    with pytest.raises(GenerateError, match=r"seeds: existing .*'num_seeds': 300.*'num_seeds': 301"):
        run_generation(GenerateConfig(**{**vars(cfg), "num_seeds": 301}))
    with pytest.raises(GenerateError, match="shard_size"):
        run_generation(GenerateConfig(**{**vars(cfg), "shard_size": 60}))

    # --overwrite starts fresh: a new run over a small range replaces the old output entirely.
    fresh_out = tmp_path / "fresh"
    small = GenerateConfig(**{**vars(cfg), "output": str(fresh_out), "num_seeds": 20})
    run_generation(small)
    summary = run_generation(GenerateConfig(**{**vars(small), "checkpoint": str(other), "overwrite": True}))
    assert summary["generated"] == summary["manifest_rows"] == 20
    assert summary["run_id"] != first["run_id"]
    digests = duckdb.sql(f"SELECT DISTINCT model_digest FROM '{fresh_out}/manifest/*.parquet'").fetchall()
    assert digests == [(json.loads((fresh_out / "run.json").read_text())["model_digest"],)]


@pytest.mark.slow  # inductor compiles the tiny model: ~30 s
def test_compiled_actors_write_the_eager_samples(run300, tmp_path):
    """--compile default: each actor compiles before its first batch (stats.json counts the
    seconds), the seeds come out as in the eager run (captions equal, pixels within 1/255), and
    the compile mode is part of the run identity."""
    cfg, _ = run300
    out = tmp_path / "compiled"
    compiled = GenerateConfig(**{**vars(cfg), "output": str(out), "num_seeds": 32, "max_actors": 1, "compile": "default"})
    assert run_generation(compiled)["manifest_rows"] == 32
    assert json.loads((out / "stats.json").read_text())["seconds"]["actor_compile"] > 0
    assert json.loads((out / "run.json").read_text())["compile"] == "default"
    eager = {r["seed"]: r for r in read_manifest(cfg.output).to_pylist()}
    for row in read_manifest(str(out)).to_pylist():
        ref = eager[row["seed"]]
        assert row["caption"] == ref["caption"]
        a, b = png_pixels(str(out), row["image_path"]), png_pixels(cfg.output, ref["image_path"])
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, f"seed {row['seed']}"
    with pytest.raises(GenerateError, match=r"compile: existing 'default', this run 'off'"):
        run_generation(GenerateConfig(**{**vars(compiled), "compile": "off"}))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed_start": -1}, "seed_start must be >= 0"),
        ({"seed_start": 2**63 - 10}, "overflows int64"),
        ({"num_seeds": 0}, "num_seeds must be > 0"),
        ({"num_seeds": None}, "exactly one of num_seeds"),
        ({"seeds_file": "x.txt"}, "exactly one of num_seeds"),
        ({"num_seeds": None, "seeds_file": "x.txt", "seed_start": 5}, "seed_start applies to a seed range"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"min_actors": 3, "max_actors": 2}, "max_actors must be >= min_actors"),
        ({"checkpoint": "/nonexistent/ckpt"}, r"checkpoint '/nonexistent/ckpt': config.json: missing"),
    ],
)
def test_bad_input_fails_before_any_work(change, message, ckpt, tmp_path):
    out = tmp_path / "out"
    cfg = GenerateConfig(checkpoint=ckpt[0], output=str(out), num_seeds=100, **FAST)
    with pytest.raises(GenerateError, match=message):
        run_generation(GenerateConfig(**{**vars(cfg), **change}))
    assert not out.exists(), "nothing may be written for bad input"


@pytest.mark.parametrize(
    "text, message",
    [
        ("1\n2\nx\n", r"seeds.txt:3: not an integer seed"),
        ("1\n-5\n", r"seeds.txt:2: seed -5 is outside"),
        (f"{2**63}\n", "is outside"),
        ("7\n8\n7\n", r"seeds.txt:3: seed 7 repeats line 1"),
        ("# nothing\n\n", "no seeds"),
    ],
)
def test_bad_seeds_file(text, message, ckpt, tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text(text)
    cfg = GenerateConfig(checkpoint=ckpt[0], output=str(tmp_path / "out"), seeds_file=str(seeds))
    with pytest.raises(GenerateError, match=message):
        run_generation(cfg)


def test_unwritable_output_and_corrupt_checkpoint(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(GenerateError, match="not writable"):
        run_generation(GenerateConfig(checkpoint=ckpt[0], output=str(blocker / "out"), num_seeds=10))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(ckpt[0]):
        (broken / name).write_bytes(Path(ckpt[0], name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(GenerateError, match=r"checkpoint .*broken.*model.safetensors"):
        run_generation(GenerateConfig(checkpoint=str(broken), output=str(tmp_path / "out"), num_seeds=10))


def test_resources_resolve_on_the_cluster(ray_local, ckpt, tmp_path):
    """The local test cluster has no GPUs: auto means CPU with one actor; asking for GPUs fails
    before run.json is written."""
    cfg = resolve_resources(GenerateConfig(num_seeds=10))
    assert (cfg.num_gpus, cfg.min_actors, cfg.max_actors) == (0.0, 1, 1)
    with pytest.raises(GenerateError, match="at most 0 GPUs"):
        resolve_resources(GenerateConfig(num_seeds=10, num_gpus=1))
    out = tmp_path / "cuda"
    with pytest.raises(GenerateError, match="device 'cuda' needs GPUs"):
        run_generation(GenerateConfig(checkpoint=ckpt[0], output=str(out), num_seeds=10, device="cuda"))
    assert not (out / "run.json").exists()


@pytest.mark.slow  # the job's command in a subprocess
def test_job_cli_rejects_bad_range_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.generate", "--num-seeds", "-3", "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "error: num_seeds must be > 0" in result.stderr


@pytest.mark.slow  # a whole run, resumed, on S3 (moto)
def test_s3_output(ckpt, ray_local, s3_server):
    out = "s3://inkseed-test/generate/run1"
    cfg = GenerateConfig(
        checkpoint=ckpt[0], output=out, num_seeds=60, batch_size=16, **{**FAST, "shard_size": 25}
    )
    summary = run_generation(cfg)
    assert summary["manifest_rows"] == 60
    rows = read_manifest(out)
    assert duckdb.sql("SELECT count(*), count(DISTINCT seed) FROM rows").fetchall() == [(60, 60)]
    for row in rows.to_pylist():
        data = storage.read_bytes(storage.join(out, row["image_path"]))
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(out, "manifest"))] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert json.loads(storage.read_bytes(storage.join(out, "run.json")))["seeds"]["num_seeds"] == 60
    # Resuming on S3 works the same way: a missing part is regenerated, the rest skipped.
    fs, root = storage.filesystem(out)
    fs.delete_file(f"{root}/manifest/part-00001.parquet")
    again = run_generation(cfg)
    assert (again["generated"], again["manifest_rows"]) == (25, 60)
    # The lease (conditional PUTs on S3) is gone after the run; verification reads every image there.
    assert not storage.exists(storage.join(out, "lease.json"))
    assert verify_output(out).ok
    fs.delete_file(f"{root}/{rows['image_path'][30].as_py()}")
    report = verify_output(out)
    assert report.damaged_shards == [1] and report.mismatched == 1


def test_a_cpu_actor_uses_the_cores_its_pool_may_use(ckpt, tmp_path):
    """torch threads come from the node's CPUs shared by the pool (not Ray's fractional num_cpus:
    0.5 -> 1 thread), or from --torch-threads."""
    from model.checkpoint import read_checkpoint_files
    from pipeline.generation.sampler import SampleBatch

    path, digest = ckpt
    files = read_checkpoint_files(lambda name: (Path(path) / name).read_bytes(), path)
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        for threads, pool, expected in ((None, 1, cores), (None, 2 * cores, 1), (3, 1, 3)):
            actor = SampleBatch(files, digest, str(tmp_path), device="cpu", batch_size=4, bf16=None, steps=2,
                                io_threads=1, torch_threads=threads, pool_size=pool)  # fmt: skip
            assert torch.get_num_threads() == expected
            del actor
    finally:
        torch.set_num_threads(before)
