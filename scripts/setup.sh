#!/usr/bin/env bash
# One-time set-up: installs CPU libtorch 2.13.0 into a cache folder outside
# the repository (about 500 MB, downloaded once) and builds the release
# binaries into target/release. The binaries find libtorch on their own.
set -euo pipefail
cd "$(dirname "$0")/.."
LIBTORCH=$(scripts/install-libtorch.sh)
export LIBTORCH
echo "libtorch: $LIBTORCH" >&2
cargo build --release --bins
echo "built target/release/dssgd-server and target/release/dssgd-participant" >&2
