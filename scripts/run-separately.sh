#!/usr/bin/env bash
# Runs the main job with every piece started by hand as its own process, as
# on separate machines: one server, N `collaborate` participants, both
# baselines, then `evaluate` for the final global model. Settings beyond
# the few below are the binaries' defaults, the same as `simulate`'s.
#
#   scripts/run-separately.sh [OUTPUT_DIR]
#
# Environment: DSSGD_DATA_DIR (default ../shared/data/mnist), PARTICIPANTS
# (30), MODEL (mlp), PORT (50551), EXTRA (more flags for every training
# process, for example "--epochs 100 --gamma 0.002").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/separately}
DATA=${DSSGD_DATA_DIR:-../shared/data/mnist}
PARTICIPANTS=${PARTICIPANTS:-30}
MODEL=${MODEL:-mlp}
PORT=${PORT:-50551}
EXTRA=${EXTRA:-}
BIN=target/release
mkdir -p "$OUT/logs" "$OUT/metrics"

started=$(date +%s)
"$BIN/dssgd-server" --listen "127.0.0.1:$PORT" --insecure --model "$MODEL" >"$OUT/logs/server.out" 2>"$OUT/logs/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT

common=(--model "$MODEL" --data-dir "$DATA" --participants "$PARTICIPANTS")
pids=()
for ((i = 0; i < PARTICIPANTS; i++)); do
    id=$(printf 'p%03d' "$i")
    # shellcheck disable=SC2086
    "$BIN/dssgd-participant" collaborate "${common[@]}" $EXTRA --index "$i" \
        --insecure --server "http://127.0.0.1:$PORT" --metrics "$OUT/metrics/$id.json" \
        >"$OUT/logs/$id.out" 2>"$OUT/logs/$id.log" &
    pids+=($!)
done
for method in standalone centralized; do
    # shellcheck disable=SC2086
    "$BIN/dssgd-participant" "$method" "${common[@]}" $EXTRA \
        --metrics "$OUT/metrics/$method.json" >"$OUT/logs/$method.out" 2>"$OUT/logs/$method.log" &
    pids+=($!)
done
echo "started the server and $PARTICIPANTS participants; logs in $OUT/logs" >&2
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
if ((failed)); then
    echo "a process failed; see $OUT/logs" >&2
    exit 1
fi
"$BIN/dssgd-participant" evaluate "${common[@]}" --server "http://127.0.0.1:$PORT" \
    --metrics "$OUT/metrics/global.json" >"$OUT/logs/evaluate.out" 2>"$OUT/logs/evaluate.log"
cat "$OUT/logs/evaluate.out" "$OUT/logs/standalone.out" "$OUT/logs/centralized.out"
echo "wall time $(($(date +%s) - started)) s"
