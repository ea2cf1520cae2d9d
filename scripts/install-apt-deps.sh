#!/usr/bin/env bash
# Debian packages vzpy needs on the host. Idempotent: apt skips what is already installed.
set -euo pipefail
packages=(
  rsync openssh-client openssh-server iproute2 nftables iptables util-linux procps
  busybox-static debootstrap patchelf zstd tar xz-utils ca-certificates
  debian-archive-keyring python3-venv tmux gcc libc6-dev
  qemu-system-x86 qemu-utils e2fsprogs  # the VM lab (make lab-image; tests/integration/lab)
  systemd  # systemd-analyze: the tests check packaging/vzpy.service with it
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "vzpy setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
