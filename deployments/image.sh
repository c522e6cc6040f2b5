#!/usr/bin/env bash
# Build the ctcd image with podman where no container registry is reachable (only PyPI and a
# Debian mirror): the base is made from Debian packages with mmdebstrap and kept in podman's
# storage as $CTCD_BASE_IMAGE (built once, reused), then `make image` builds the Containerfile
# on it with this machine's CA bundle mounted read-only for the build's downloads (never
# copied into the image).
#   deployments/image.sh [IMAGE]      # default ctcd:latest
# Podman's settings (runtime, ulimits) come from containers.conf, or CONTAINERS_CONF.
set -euo pipefail
image="${1:-ctcd:latest}"
base="${CTCD_BASE_IMAGE:-localhost/ctcd-base:bookworm}"
ca="${CTCD_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
cd "$(dirname "$0")/.."

if ! podman image exists "$base"; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mirrors=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list)
  existing=()
  for m in "${mirrors[@]}"; do [ -s "$m" ] && existing+=("$m"); done
  echo "building base image $base from Debian bookworm packages (mmdebstrap)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/base.tar" "${existing[@]}"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$work/base.tar" "$base" >/dev/null
fi

flags=()
[ -s "$ca" ] && flags+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
make --no-print-directory image CONTAINER_ENGINE=podman BASE="$base" IMAGE="$image" \
  IMAGE_BUILD_FLAGS="${flags[*]}"
