"""README.md and docs/ stay true. docs/jobs.md is exactly what scripts/jobs_doc.py renders from
every job's `--help`; the README's Python example and DuckDB queries run; every job command shown
uses real flags; the tables and links match the code and the files.

Elsewhere: tests/jobs/test_job_submit.py runs the README's DuckDB queries on a real generation
output, tests/pipeline/generation/test_formats.py runs docs/outputs.md's format snippets.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shlex
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from model.config import PRESETS
from pipeline.generation.manifest import SCHEMA

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (REPO / "docs").glob("*.md")}
# The pages people write and keep current: docs/jobs.md is generated (and checked against --help
# below); docs/quality.md is a record of past runs, whose commands keep the flags they had then.
WRITTEN = {
    "README.md": README,
    **{f"docs/{name}": text for name, text in DOCS.items() if name not in ("jobs.md", "quality.md")},
}


def load_jobs_doc():
    """scripts/jobs_doc.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("jobs_doc", REPO / "scripts" / "jobs_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jobs_doc = load_jobs_doc()


def section(text: str, title_start: str) -> str:
    """The text from the heading that starts with `title_start` to the next heading of the same or
    a higher level."""
    match = re.search(rf"^(#+) {re.escape(title_start)}.*$", text, flags=re.M)
    assert match, f"no heading starting with {title_start!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


# -- docs/jobs.md: generated, never stale ----------------------------------------------------------
def test_docs_jobs_md_matches_every_jobs_help():
    diff = jobs_doc.stale_diff()
    if diff:
        shown = "".join(diff.splitlines(keepends=True)[:60])
        pytest.fail(f"docs/jobs.md is stale: regenerate it with `{jobs_doc.WRITE}`\n{shown}", pytrace=False)


def test_every_job_is_in_docs_jobs_md():
    """Every runnable module of jobs/ is a job the script documents (it finds them by parse_args)."""
    runnable = {p.stem for p in (REPO / "jobs").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    assert runnable and runnable == set(jobs_doc.job_names())
    for name in runnable:
        assert f"$ python -m jobs.{name} --help\nusage: python -m jobs.{name} " in DOCS["jobs.md"]


def help_flags(job: str) -> set[str]:
    """The long flags of `python -m jobs.<job> --help`: the ones in tyro's option column."""
    invocations = re.findall(r"^ {1,2}(--\S.*?)(?: {2,}|$)", jobs_doc.job_help(job), flags=re.M)
    return {flag for inv in invocations for flag in re.findall(r"--[a-z][a-z0-9.-]*", inv)}


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """Every `python -m jobs.NAME ...` in the shell blocks of `text`: (NAME, its arguments up to a
    comment, `&&`, `|` or the end of the command; continuation lines joined)."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"python -m jobs\.(\w+)(.*)", line):
                rest = re.split(r"\s#|&&|\|", match.group(2))[0]
                commands.append((match.group(1), shlex.split(rest)))
    return commands


def test_every_job_command_shown_uses_real_flags():
    seen = set()
    for page, text in WRITTEN.items():
        for job, args in job_commands(text):
            assert job in jobs_doc.job_names(), f"{page}: python -m jobs.{job} is not a job"
            unknown = {a.split("=")[0] for a in args if a.startswith("--")} - help_flags(job)
            assert not unknown, f"{page}: python -m jobs.{job} has no flag {sorted(unknown)}"
            seen.add(job)
    assert {"prepare_data", "train", "generate", "evaluate", "sample", "demo", "export"} <= seen


# -- the README's code runs ------------------------------------------------------------------------
@pytest.mark.usefixtures("one_torch_thread")
def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    section_text = section(README, "Python")
    [example] = code_blocks(section_text, "python")
    assert "load_checkpoint" in example and "generate(" in example and "caption(" in example
    monkeypatch.chdir(tmp_path)
    exec(example.replace('"checkpoints/default"', repr(str(REPO / "checkpoints" / "default"))), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["seed", "0"], ["seed", "1"], ["seed", "2"]]
    assert all(len(line.split("  ")[-1]) > 10 for line in lines[:3])  # a caption after the score
    captions = eval(lines[3])  # the printed list of one caption
    assert isinstance(captions, list) and len(captions) == 1 and captions[0].strip()
    png = tmp_path / "seed0.png"
    assert png.read_bytes().startswith(b"\x89PNG")


def write_manifest(out: Path, captions: list[str]) -> None:
    """A small files-format output: one part and one PNG per seed, as jobs.generate lays it out."""
    from model.images import png_bytes

    rows = []
    for seed, caption in enumerate(captions):
        data = png_bytes(np.full((8, 8), seed * 20, np.uint8))
        path = f"images/00000/{seed}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
        rows.append({
            "seed": seed, "shard": 0, "caption": caption, "image_path": path,
            "image_sha256": hashlib.sha256(data).hexdigest(), "width": 8, "height": 8,
            "alignment": 0.9 - 0.1 * seed, "model_digest": "d", "run_id": "r",
            "created_at": datetime.now(timezone.utc),
        })  # fmt: skip
    (out / "manifest").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / "manifest" / "part-00000.parquet")


def test_the_duckdb_queries_run(tmp_path):
    captions = [
        "an etching of a windmill on the hills, by night",
        "a print of a cottage in the town, at dusk",
        "an etching of a ship at sea, by day",
        "a print of a house in a field, with a bird",
        "an engraving of a windmill in the fields, at twilight",
        "an etching of an oak tree in a field, by day",
    ]
    write_manifest(tmp_path, captions)
    queries = code_blocks(section(README, "Query the manifest"), "sql")
    assert len(queries) == 4, "tests/jobs/test_job_submit.py reads exactly these four"
    words, subjects, lowest, joined = (
        duckdb.sql(q.replace("outputs/demo/generate", str(tmp_path))).fetchall() for q in queries
    )
    counts = Counter(w for c in captions for w in c.lower().split(" "))
    assert words[0] == ("a", counts["a"]) and all(counts[w] == n for w, n in words)
    assert [n for _, n in words] == sorted((n for _, n in words), reverse=True)
    assert dict((s, n) for s, n, _ in subjects) == {"windmill": 2, "house": 2, "ship": 1, "tree": 1}
    assert [seed for seed, *_ in lowest] == [5, 4, 3, 2, 1]
    assert [seed for seed, *_ in joined] == [0, 1, 2, 3, 4]
    assert all(Path(png).is_file() for *_, png in joined)


# -- tables, commands, links -------------------------------------------------------------------------
def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 250
    assert "<!-- checkpoint numbers -->" in README
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README
        assert (REPO / script).is_file()
    assert 'bash scripts/test.sh -m "not slow"' in README
    assert '-m "not slow"' in (REPO / "scripts" / "test.sh").read_text().split("set -euo")[0]
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_manifest_columns_match_the_schema():
    table = section(DOCS["outputs.md"], "The manifest")
    documented = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", table, flags=re.M))
    names = {name for pair in documented for name in pair if name}
    assert names == set(SCHEMA.names)


def test_presets_match_model_config():
    rows = re.findall(r"^\| `(\w+)` \| (\d+) px \| (\d+) \|", README, flags=re.M)
    assert {name: (int(size), int(z)) for name, size, z in rows} == {
        name: (cfg.image_size, cfg.z_dim) for name, cfg in PRESETS.items()
    }


def test_the_cluster_run_config_is_a_valid_train_config():
    from pipeline.training.config import TrainConfig

    block = re.search(r"cat > h100\.yaml <<'YAML'\n(.*?)\nYAML\n", DOCS["cluster.md"], flags=re.S)
    assert block, "docs/cluster.md lost its cluster run config"
    cfg = TrainConfig.from_dict(yaml.safe_load(block.group(1)))
    assert cfg.use_gpu and cfg.num_workers == 16 and not cfg.check_resources
    assert cfg.storage_path.startswith("s3://")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces -> -."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    pages = {"README.md": README, **{f"docs/{name}": text for name, text in DOCS.items()}}
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (REPO / page).parent / path if path else REPO / page
            assert file.exists(), f"{page} links to {target}: no such file"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file.read_text()), f"{page} links to {target}: no such heading"
