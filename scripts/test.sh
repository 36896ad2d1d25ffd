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
cargo test --release --workspace
