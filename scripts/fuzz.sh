#!/usr/bin/env bash
# Runs the cargo fuzz target decode_request (fuzz/fuzz_targets/) for a
# number of seconds: random join, download and upload request bytes go
# through protobuf decoding and the server's validation and application.
#
#   scripts/fuzz.sh [SECONDS]     default 30
#
# cargo fuzz needs a nightly toolchain. Without one the script prints why and
# exits 0; with one it installs cargo-fuzz from crates.io when missing. The
# corpus is kept in fuzz/corpus/decode_request, so later runs start from
# what earlier runs found. A crash fails the script and leaves the input in
# fuzz/artifacts/decode_request.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-30}
if ! [[ $DURATION =~ ^[0-9]+$ ]] || ((DURATION < 1)); then
    echo "invalid duration '$DURATION': expected a whole number of seconds, at least 1" >&2
    exit 2
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped: cargo fuzz needs a nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io" >&2
    cargo install --locked cargo-fuzz >&2
fi
echo "fuzz: running decode_request for $DURATION s" >&2
# libFuzzer's statistics go to a log, whose last lines are shown on failure.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! cargo +nightly fuzz run --fuzz-dir fuzz decode_request -- \
    -max_total_time="$DURATION" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: decode_request failed; the input is in fuzz/artifacts/decode_request" >&2
    exit 1
fi
runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
echo "fuzz: decode_request ran $runs inputs in $DURATION s without a failure"
