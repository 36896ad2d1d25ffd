#!/usr/bin/env bash
# The test command: formatting, lints with warnings denied, then every unit
# and end-to-end test. End-to-end tests start the real server and real
# participant processes on loopback and train on real MNIST, read from
# DSSGD_MNIST_DIR (default: ../shared/data/mnist beside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
LIBTORCH=$(scripts/install-libtorch.sh)
export LIBTORCH
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --bins
# The compose tests (tests/tests/compose.rs) run the images built here from
# the release binaries; without a Docker engine they print why they skip.
if docker info >/dev/null 2>&1; then
    scripts/docker-images.sh >/dev/null
    echo "built the images dssgd-server and dssgd-participant for the compose tests" >&2
else
    echo "no Docker engine answers: the compose tests will be skipped" >&2
fi
# A short fuzz run of the server's request handling (skipped with a message
# where no nightly toolchain exists).
scripts/fuzz.sh "${DSSGD_FUZZ_SECONDS:-30}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"
# One closing line for the whole run: the last block cargo prints is the
# doc-tests of the last crate, which has none.
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "\ntests: %d passed, %d failed\n", passed, failed }' "$log"
