#!/usr/bin/env bash
# Fetch the OpenMoji line-art source (npm package openmoji@17.0.0: black/svg/*.svg and
# data/openmoji.json) into a cache folder outside the repo, and print the package folder:
#
#   bash scripts/fetch_openmoji.sh            # -> ~/.cache/inkseed/openmoji/node_modules/openmoji
#   export INKSEED_OPENMOJI="$(bash scripts/fetch_openmoji.sh)"
#
# INKSEED_OPENMOJI_HOME moves the cache. Idempotent: when that version is already there it only
# prints the path (no registry access). Needs npm. The drawings are CC BY-SA 4.0 (openmoji.org).
set -euo pipefail

VERSION="17.0.0"
HOME_DIR="${INKSEED_OPENMOJI_HOME:-$HOME/.cache/inkseed/openmoji}"
PKG="$HOME_DIR/node_modules/openmoji"

installed_version() {
    # The version npm installed, read from its package.json (node is there whenever npm is).
    [ -f "$PKG/package.json" ] && node -p "require(process.argv[1]).version" "$PKG/package.json" 2>/dev/null
}

if [ "$(installed_version || true)" != "$VERSION" ] || [ ! -f "$PKG/data/openmoji.json" ] || [ ! -d "$PKG/black/svg" ]; then
    command -v npm >/dev/null || { echo "fetch_openmoji.sh needs npm (Node.js) on PATH" >&2; exit 1; }
    mkdir -p "$HOME_DIR"
    # npm's summary to /dev/null (errors still reach stderr): this script's stdout is only the path.
    npm install --prefix "$HOME_DIR" --no-audit --no-fund --loglevel=error "openmoji@$VERSION" >/dev/null
fi
[ -f "$PKG/data/openmoji.json" ] || { echo "openmoji@$VERSION: no data/openmoji.json under $PKG" >&2; exit 1; }
echo "$PKG"
