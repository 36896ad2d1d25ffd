#!/usr/bin/env bash
# Installs a CPU-only libtorch 2.13.0 (the version tch 0.26 is built against)
# from PyPI wheels into a cache folder outside the repository, then prints the
# folder. A second run finds the cache and returns at once.
#
# The torch wheel on PyPI is the CUDA build, and libtorch_cpu.so links
# libcudart and libcupti even when no GPU is used, so those two runtime
# libraries come from their own NVIDIA wheels. Only the CPU libraries go into
# lib/, so tch links CPU-only.
set -euo pipefail

TORCH_VERSION=2.13.0
CACHE_DIR=${DSSGD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dssgd}
TARGET=${LIBTORCH_DIR:-$CACHE_DIR/libtorch-$TORCH_VERSION-cpu}

if [[ -f "$TARGET/.complete" ]]; then
    echo "$TARGET"
    exit 0
fi

mkdir -p "$CACHE_DIR/wheels"
WHEELS=$CACHE_DIR/wheels
echo "downloading torch $TORCH_VERSION and the CUDA runtime wheels into $WHEELS" >&2
python3 -m pip download --quiet --no-deps --dest "$WHEELS" \
    "torch==$TORCH_VERSION" \
    "nvidia-cuda-runtime==13.0.96.*" \
    "nvidia-cuda-cupti==13.0.85.*" >&2

STAGE=$(mktemp -d "$CACHE_DIR/stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
for wheel in "$WHEELS"/torch-"$TORCH_VERSION"-*.whl; do
    python3 -m zipfile -e "$wheel" "$STAGE/torch" >&2
done
for wheel in "$WHEELS"/nvidia_cuda_runtime-*.whl "$WHEELS"/nvidia_cuda_cupti-*.whl; do
    python3 -m zipfile -e "$wheel" "$STAGE/nvidia" >&2
done

rm -rf "$TARGET"
mkdir -p "$TARGET/lib"
cp -r "$STAGE/torch/torch/include" "$TARGET/include"
for lib in libc10.so libtorch_cpu.so libtorch.so; do
    cp "$STAGE/torch/torch/lib/$lib" "$TARGET/lib/"
done
cp "$STAGE"/torch/torch/lib/libgomp*.so* "$TARGET/lib/" 2>/dev/null || true
find "$STAGE/nvidia" \( -name 'libcudart.so*' -o -name 'libcupti.so*' \) \
    -exec cp {} "$TARGET/lib/" \;
touch "$TARGET/.complete"
echo "$TARGET"
