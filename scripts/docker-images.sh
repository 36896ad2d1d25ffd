#!/usr/bin/env bash
# Builds the container images dssgd-server and dssgd-participant.
#
#   scripts/docker-images.sh            from the host's release binaries and
#                                       CPU libtorch (docker/Dockerfile.prebuilt);
#                                       uses no registry and no network
#   scripts/docker-images.sh --source   compiled inside `docker build`
#                                       (docker/Dockerfile); needs an image
#                                       registry, crates.io and PyPI
#
# Environment:
#   DSSGD_IMAGE_TAG  tag of both images (default latest)
#   BASE_IMAGE       runtime base. Host binaries: dssgd-base:bookworm, made
#                    by scripts/docker-base.sh when missing (that needs root).
#                    Source: debian:bookworm-slim.
#   RUST_IMAGE       source builds only: the compiler image
#   TORCH_VARIANT    source builds only: cpu (default) or cuda
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${DSSGD_IMAGE_TAG:-latest}

case ${1:-} in
--source)
    args=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}")
    [[ -z ${RUST_IMAGE:-} ]] || args+=(--build-arg "RUST_IMAGE=$RUST_IMAGE")
    [[ -z ${TORCH_VARIANT:-} ]] || args+=(--build-arg "TORCH_VARIANT=$TORCH_VARIANT")
    docker build -f docker/Dockerfile --target server "${args[@]}" -t "dssgd-server:$TAG" .
    docker build -f docker/Dockerfile --target participant "${args[@]}" -t "dssgd-participant:$TAG" .
    docker image ls --filter "reference=dssgd-*:$TAG"
    exit 0
    ;;
"") ;;
*)
    echo "usage: scripts/docker-images.sh [--source]" >&2
    exit 2
    ;;
esac

BASE=${BASE_IMAGE:-dssgd-base:bookworm}
if [[ $BASE == dssgd-base:bookworm ]]; then
    scripts/docker-base.sh >/dev/null
fi
LIBTORCH=$(scripts/install-libtorch.sh)
export LIBTORCH
cargo build --release --bins

# Two build contexts, so that the server build does not send libtorch to
# the engine. Debug line tables are stripped: they double the binaries.
CONTEXT=target/docker-context
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/server/bin" "$CONTEXT/participant/bin" "$CONTEXT/participant/libtorch"
objcopy --strip-debug target/release/dssgd-server "$CONTEXT/server/bin/dssgd-server"
objcopy --strip-debug target/release/dssgd-participant "$CONTEXT/participant/bin/dssgd-participant"
cp "$CONTEXT/server/bin/dssgd-server" "$CONTEXT/participant/bin/"
# Hard links save copying 430 MB when the cache is on the same file system.
cp -rl "$LIBTORCH/lib" "$CONTEXT/participant/libtorch/" 2>/dev/null ||
    cp -r "$LIBTORCH/lib" "$CONTEXT/participant/libtorch/"
mkdir -p "$CONTEXT/participant/docker"
cp docker/participant-entrypoint.sh docker/report.sh "$CONTEXT/participant/docker/"

docker build -f docker/Dockerfile.prebuilt --target server --build-arg "BASE_IMAGE=$BASE" \
    -t "dssgd-server:$TAG" "$CONTEXT/server"
docker build -f docker/Dockerfile.prebuilt --target participant --build-arg "BASE_IMAGE=$BASE" \
    -t "dssgd-participant:$TAG" "$CONTEXT/participant"
docker image ls --filter "reference=dssgd-*:$TAG"
