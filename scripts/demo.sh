#!/usr/bin/env bash
# The README's main command: install inkseed, then generate engravings and their captions from seeds.
#
#   bash scripts/demo.sh                   # 64 seeds from the embedded checkpoint
#   NUM_SEEDS=1000 bash scripts/demo.sh    # more
#
# Uses checkpoints/default when the checkout has it; otherwise renders a small dataset and trains a
# tiny model first (a few minutes on a laptop CPU). Everything it writes goes under outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
NUM_SEEDS="${NUM_SEEDS:-64}"
DEMO=outputs/demo
OUT="$DEMO/generate"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "inkseed needs Python 3.10+; $PYTHON is $("$PYTHON" --version 2>&1)" >&2; exit 1; }

echo "== install"
# CPU torch only when no torch is there: a GPU user installs the CUDA build first and keeps it.
"$PYTHON" -c 'import torch' 2>/dev/null || "$PYTHON" -m pip install torch==2.13.0
"$PYTHON" -m pip install --quiet -e .
# The manifest query at the end uses DuckDB (a dev extra, not needed to generate).
"$PYTHON" -c 'import duckdb' 2>/dev/null || "$PYTHON" -m pip install --quiet duckdb

export RAY_USAGE_STATS_ENABLED=0

CHECKPOINT=checkpoints/default
if [ ! -f "$CHECKPOINT/model.safetensors" ]; then
    CHECKPOINT="$DEMO/runs/demo-tiny/export"
    if [ ! -f "$CHECKPOINT/model.safetensors" ]; then
        echo "== no embedded checkpoint in this checkout: render a small dataset and train a tiny model"
        if [ ! -f "$DEMO/data/metadata.jsonl" ]; then
            "$PYTHON" -m jobs.prepare_data --out "$DEMO/data" --count 2000 --size 64 --seed 0
        fi
        "$PYTHON" -m jobs.train --config tiny --data "$DEMO/data" \
            --storage-path "$DEMO/runs" --name demo-tiny
    fi
fi

echo "== generate $NUM_SEEDS seeds from $CHECKPOINT"
# --overwrite: a demo rerun (maybe with another checkpoint) always starts a fresh output.
"$PYTHON" -m jobs.generate --checkpoint "$CHECKPOINT" --num-seeds "$NUM_SEEDS" --output "$OUT" --overwrite

echo "== contact sheet"
SHEET=$("$PYTHON" -m pipeline.contact_sheet "$OUT" --count 16)

QUERY="SELECT seed, round(alignment, 3) AS alignment, caption FROM '$OUT/manifest/*.parquet' ORDER BY seed LIMIT 5"
"$PYTHON" -c "import duckdb, sys; duckdb.sql(sys.argv[1]).show(max_width=200)" "$QUERY"

cat <<EOF

Done: $NUM_SEEDS engravings with their captions, from $CHECKPOINT.
  images:        $OUT/images/<shard>/<seed>.png
  manifest:      $OUT/manifest/*.parquet   (one row per seed: caption, image_path, alignment, ...)
  contact sheet: $SHEET
  run record:    $OUT/run.json

Query the manifest with DuckDB (README.md has more):
  $PYTHON -c "import duckdb; duckdb.sql(\"$QUERY\").show()"
EOF
