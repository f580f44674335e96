"""README.md stays true: every job flag, manifest column and preset it documents exists, and
everything that exists is documented. (Its DuckDB queries run in tests/test_job_submit.py.)"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import yaml

from model.config import PRESETS
from pipeline.generation.manifest import SCHEMA

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
JOBS = ("prepare_data", "train", "generate", "evaluate", "sample", "demo", "export", "verify")


def section(title_start: str) -> str:
    """The README text from the heading that starts with `title_start` to the next heading of the
    same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title_start)}.*$", README, flags=re.M)
    assert match, f"README.md has no heading starting with {title_start!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def help_flags(job: str) -> set[str]:
    """The long flags `python -m jobs.<job> --help` defines (tyro's option column: the lines that
    start with a flag, not flags mentioned in help texts)."""
    module = importlib.import_module(f"jobs.{job}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    invocations = re.findall(r"^[│ ] ?(--\S.*?)(?: {2,}|│|$)", out.getvalue(), flags=re.M)
    flags = {flag for inv in invocations for flag in re.findall(r"--[a-z][a-z0-9.-]*", inv)} - {"--help"}
    assert flags, f"no flags found in jobs.{job} --help"
    return without_negations(flags)


def without_negations(flags: set[str]) -> set[str]:
    """A boolean's --no-NAME twin goes with --NAME."""
    return {f for f in flags if not (f.startswith("--no-") and f"--{f[5:]}" in flags)}


@pytest.mark.parametrize("job", JOBS)
def test_every_flag_of_each_job_is_documented_and_no_other(job):
    documented = set(re.findall(r"`(--[a-z][a-z0-9.-]*)", section(f"`jobs.{job}`"))) - {"--help"}
    documented = without_negations(documented)
    assert help_flags(job) == documented


def test_manifest_columns_match_the_schema():
    table = section("The manifest").split("### ")[0]
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", table, flags=re.M))
    names = {name for pair in documented for name in pair if name}
    assert names == set(SCHEMA.names)


def test_presets_match_model_config():
    rows = re.findall(r"^\s*\| `(\w+)` \| (\d+) px \| (\d+) \|", section("Configuration"), flags=re.M)
    assert {name: (int(size), int(z)) for name, size, z in rows} == {
        name: (cfg.image_size, cfg.z_dim) for name, cfg in PRESETS.items()
    }


def test_the_two_commands_exist():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README
        assert (REPO / script).is_file()
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_cluster_run_config_is_a_valid_train_config():
    from pipeline.training.config import TrainConfig

    block = re.search(r"cat > h100\.yaml <<'YAML'\n(.*?)\nYAML\n", README, flags=re.S)
    assert block, "README.md lost its cluster run config"
    cfg = TrainConfig.from_dict(yaml.safe_load(block.group(1)))
    assert cfg.use_gpu and cfg.num_workers == 16 and not cfg.check_resources
    assert cfg.storage_path.startswith("s3://")
