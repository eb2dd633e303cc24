#!/usr/bin/env bash
# A Debian base image made from the Debian mirror alone, for machines that reach no
# container registry: debootstrap (minbase, with python3 and its venv module) and
# `docker import`. Prints the tag, vggprice-debian:<hash of this script and the suite>,
# and reuses an image of that tag when dockerd has one. Needs root and debootstrap.
#   infra/docker/build.sh --debian-base cpu   (calls this)
set -euo pipefail
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tag="vggprice-debian:$({ cat "$0"; echo "$suite $mirror"; } | sha256sum | cut -c1-12)"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root" "$root.log"' EXIT
echo "debootstrap $suite from $mirror ..." >&2
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
  "$suite" "$root" "$mirror" > "$root.log" 2>&1 || { tail -30 "$root.log" >&2; exit 1; }
security=${mirror%/debian}/debian-security
cat > "$root/etc/apt/sources.list" <<LIST
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
LIST
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$tag" >/dev/null
echo "$tag"
