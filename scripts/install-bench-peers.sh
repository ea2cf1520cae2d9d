#!/usr/bin/env bash
# `make bench-peers`: what bench/chkpnt compares vzpy with, from Debian's packages only (idempotent, as root):
# Podman with runc (not crun) and conmon. Nothing is configured here: bench/peers.py gives Podman a private
# containers.conf and storage per run and puts vzpy's CRIU first on PATH for it (Debian 12's own criu 3.17
# does not start on this kernel, so the criu package is not installed). Images are built locally from a
# tarball; no registry is contacted.
set -euo pipefail
CRIU=${VZPY_CRIU:-/opt/vzpy/criu/bin/criu}
packages=(podman runc conmon golang-github-containers-common)

if [ "$(id -u)" != 0 ]; then
  echo "bench peers: run as root (apt-get install)" >&2
  exit 12
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bench peers: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no recommends: buildah, slirp4netns, fuse-overlayfs and the like serve rootless or networked containers
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
podman --version
runc --version | head -n 1
if ! "$CRIU" --version >/dev/null 2>&1; then
  echo "bench peers: no working CRIU at $CRIU; \`make setup\` installs vzpy's (Podman's checkpoints use it)" >&2
  exit 1
fi
echo "bench peers: Podman checkpoints will use CRIU $("$CRIU" --version | sed -n "s/^Version: //p") at $CRIU"
