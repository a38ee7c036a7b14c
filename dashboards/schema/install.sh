#!/usr/bin/env bash
# Installs what check.mjs needs (Grafana's dashboard schema, `@grafana/schema`, and the
# TypeScript compiler, exact versions from package-lock.json, npm registry) into
# PREFIX/grafana-schema, idempotently: a second run with the same lockfile touches no
# network.
#
#   dashboards/schema/install.sh [PREFIX]     (default: ~/.local/share/credwatch/tools)
#
# Then: node dashboards/schema/check.mjs --modules PREFIX/grafana-schema dashboards/*.json
set -euo pipefail

PREFIX=${1:-${XDG_DATA_HOME:-$HOME/.local/share}/credwatch/tools}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEST="$PREFIX/grafana-schema"
want=$(cat "$HERE/package.json" "$HERE/package-lock.json" | sha256sum | cut -d' ' -f1)
stamp="$DEST/.lock.sha256"
if [[ -f $stamp && $(cat "$stamp") == "$want" && -d $DEST/node_modules/@grafana/schema ]]; then
  exit 0
fi
command -v npm >/dev/null || { echo "install.sh: npm is missing (Debian: npm)" >&2; exit 1; }
echo "install.sh: installing @grafana/schema and typescript (npm registry) into $DEST" >&2
rm -rf "$DEST"
mkdir -p "$DEST"
cp "$HERE/package.json" "$HERE/package-lock.json" "$DEST/"
# --ignore-scripts: nothing from the registry runs; the packages are type definitions and
# the compiler.
(cd "$DEST" && npm ci --ignore-scripts --no-audit --no-fund --silent)
echo "$want" >"$stamp"
