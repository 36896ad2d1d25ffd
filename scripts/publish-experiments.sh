#!/usr/bin/env bash
# Copies the outputs of finished experiments (report, tables, plots) from
# runs/NAME to docs/experiments/NAME, where the results page links them.
# The cells/ folders, with their logs, metrics and certificates, stay in runs/.
#
# Usage: scripts/publish-experiments.sh NAME...
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -eq 0 ]]; then
    echo "usage: $0 NAME...: each NAME is an experiment finished in runs/NAME" >&2
    exit 2
fi
for name in "$@"; do
    src=runs/$name
    if [[ ! -f $src/report.md ]]; then
        echo "$src/report.md not found: run the experiment first" >&2
        exit 1
    fi
    dst=docs/experiments/$name
    rm -rf "$dst"
    mkdir -p "$dst/plots"
    cp "$src/report.md" "$src/cells.csv" "$src/cells.json" "$src/experiment.toml" "$dst/"
    cp "$src"/plots/*.png "$src"/plots/*.svg "$dst/plots/"
    echo "published $src to $dst"
done
