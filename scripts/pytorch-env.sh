#!/usr/bin/env bash
# Creates, once, a Python virtual environment with PyTorch 2.13.0 from PyPI
# (the libtorch version that tch 0.26 links) in the cache folder outside the
# repository, then prints its python. The reference scripts of the
# benchmarks (scripts/pytorch/) run with it. The download is about 4 GB,
# because PyPI's torch for Linux pulls the CUDA libraries.
set -euo pipefail

TORCH_VERSION=2.13.0
CACHE_DIR=${DSSGD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dssgd}
VENV=$CACHE_DIR/torch-$TORCH_VERSION-venv

if [[ ! -f "$VENV/.complete" ]]; then
    echo "installing torch $TORCH_VERSION into $VENV" >&2
    mkdir -p "$CACHE_DIR"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy >&2
    touch "$VENV/.complete"
fi
echo "$VENV/bin/python"
