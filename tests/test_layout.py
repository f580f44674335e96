"""The size rules of the house (issue 11): no .py file in model/, pipeline/ or jobs/ over 400
lines, no function over 60 lines, a docstring atop every module, and tests/ mirroring the package."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "jobs")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_no_file_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_60_lines() -> None:
    long = {}
    for p in sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(REPO)}:{node.name}"] = n
    assert not long, long


def test_every_module_says_what_it_is_for() -> None:
    missing = [str(p.relative_to(REPO)) for p in sources() if p.name != "__init__.py" or p.stat().st_size]
    missing = [m for m in missing if ast.get_docstring(ast.parse((REPO / m).read_text())) is None]
    assert not missing, missing


def test_tests_mirror_the_package() -> None:
    """Every stage folder of pipeline/ has its folder of tests."""
    stages = sorted(p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").exists())
    assert stages, "pipeline/ has no stage packages"
    assert [s for s in stages if not (REPO / "tests" / "pipeline" / s).is_dir()] == []


def test_the_module_map_names_every_module() -> None:
    """pipeline/__init__.py's docstring and docs/architecture.md name every pipeline module, and
    README.md's folder table has a row per stage folder."""
    module_map = ast.get_docstring(ast.parse((REPO / "pipeline" / "__init__.py").read_text())) or ""
    architecture = (REPO / "docs" / "architecture.md").read_text()
    readme = (REPO / "README.md").read_text()
    for path in (REPO / "pipeline").rglob("*.py"):
        if path.name == "__init__.py":
            continue
        assert path.name in module_map, f"pipeline/__init__.py does not list {path.relative_to(REPO)}"
        stage = path.parent.name if path.parent != REPO / "pipeline" else ""
        assert f"{stage}/" in architecture or stage == "", f"docs/architecture.md has no {stage}/"
    for stage in (p for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").exists()):
        assert f"| `pipeline/{stage.name}/` |" in readme, f"README.md's folder table lacks pipeline/{stage.name}/"
