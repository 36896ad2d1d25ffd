#!/usr/bin/env bash
# Builds the local base image of the containers, dssgd-base:bookworm: a
# minimal Debian bookworm root made with debootstrap (variant minbase, plus
# jq for the compose reporter) and loaded with `docker import`. It replaces
# debian:bookworm-slim on machines that cannot pull from an image registry;
# it needs only a Debian package mirror. A run that finds the image does
# nothing, so the script is safe to call before every build.
#
#   sudo scripts/docker-base.sh
#
# Environment: DSSGD_BASE_IMAGE (the tag, default dssgd-base:bookworm),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), DSSGD_BASE_REBUILD=1
# (build again even when the image exists).
set -euo pipefail

IMAGE=${DSSGD_BASE_IMAGE:-dssgd-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=jq

if [[ ${DSSGD_BASE_REBUILD:-0} != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE exists; nothing to do (DSSGD_BASE_REBUILD=1 builds it again)" >&2
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "debootstrap needs root: run this script with sudo" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "debootstrap is missing; installing it from the Debian packages" >&2
    apt-get install -y debootstrap >&2
fi

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/dssgd-base.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap $SUITE from $MIRROR into $ROOT" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >&2

# Keep the root as small as debian:bookworm-slim: no package caches, no
# package lists, and no manuals, documentation or translations, now or in
# packages installed later (the same dpkg filter the slim images use).
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-minimal" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
cat >"$ROOT/etc/apt/apt.conf.d/docker-minimal" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/* \
    "$ROOT"/usr/share/lintian/* "$ROOT"/var/cache/apt/*.bin \
    "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
    "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/*
# The engine mounts its own /dev, /proc and /sys.
rm -rf "${ROOT:?}"/dev/* "${ROOT:?}"/proc/* "${ROOT:?}"/sys/*
: >"$ROOT/etc/hostname"
: >"$ROOT/etc/resolv.conf"

tar --numeric-owner -C "$ROOT" -c . |
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $SUITE $MIRROR" \
        - "$IMAGE" >&2
docker image ls "$IMAGE" >&2
echo "$IMAGE"
