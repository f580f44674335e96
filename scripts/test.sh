#!/usr/bin/env bash
# The README's test command: install inkseed with its dev tools, lint, run every test (slow ones too).
#
#   bash scripts/test.sh [extra pytest args]
#   bash scripts/test.sh -m "not slow"     # the fast tier: every module, without the end-to-end tests
#   bash scripts/test.sh tests/model -x    # any pytest arguments
#
# Tests marked slow (pyproject.toml's markers) are the end-to-end ones: Ray Train runs, ray job
# submit, fault injection, formats on S3, the demo in a browser. CI (.ci/run) runs everything.
#
# Fails when ruff finds a problem, when a test fails, and when pytest collects no test at all.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "inkseed needs Python 3.10+; $PYTHON is $("$PYTHON" --version 2>&1)" >&2; exit 1; }

# CPU torch only when no torch is there: a GPU user installs the CUDA build first and keeps it.
"$PYTHON" -c 'import torch' 2>/dev/null || "$PYTHON" -m pip install torch==2.13.0
"$PYTHON" -m pip install --quiet -e '.[dev]'

echo "== ruff check ."
"$PYTHON" -m ruff check .

echo "== pytest"
export RAY_USAGE_STATS_ENABLED=0
INKSEED_OPENMOJI="$(bash scripts/fetch_openmoji.sh)"; export INKSEED_OPENMOJI  # OpenMoji source (npm) for its tests
status=0
"$PYTHON" -m pytest --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"
