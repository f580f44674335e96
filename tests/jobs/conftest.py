"""Fixtures of the job tests: a real jobs.generate run of the embedded checkpoint, and a
jobs.sample runner (in-process, through its own parse_args and main)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = str(REPO / "checkpoints" / "default")
# Seeds 0..65 with batches of 64: 64 and 65 come in a short last batch (padded by generate_seeds).
RUN_SEEDS = 66


@pytest.fixture(scope="session")
def default_run(ray_local, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """jobs.generate's driver on the embedded checkpoint (jobs.sample's defaults: batch 64, the
    checkpoint's DDIM steps, fp32 on CPU): the output folder and its manifest rows by seed."""
    from pipeline.generation.config import GenerateConfig
    from pipeline.generation.run import run_generation

    out = tmp_path_factory.mktemp("default-run") / "generate"
    cfg = GenerateConfig(checkpoint=DEFAULT_CHECKPOINT, output=str(out), num_seeds=RUN_SEEDS,
                         batch_size=64, shard_size=1000, max_actors=1)  # fmt: skip
    run_generation(cfg)
    rel = duckdb.sql(f"SELECT * FROM '{out}/manifest/*.parquet' ORDER BY seed").df()
    rows = {int(r["seed"]): r for r in rel.to_dict("records")}
    assert sorted(rows) == list(range(RUN_SEEDS))
    return out, rows


@pytest.fixture(scope="session")
def run_sample():
    """run_sample(*argv): `python -m jobs.sample ARGV --json` on the embedded checkpoint, in this
    process (through its parse_args and main); returns the printed JSON."""
    from jobs import sample

    def run(*argv: str) -> dict:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = sample.main(sample.parse_args([*argv, "--json", "--checkpoint", DEFAULT_CHECKPOINT]))
        printed_result = json.loads(printed.getvalue())
        assert printed_result == json.loads(json.dumps(result))
        return printed_result

    return run
