#!/usr/bin/env bash
# Provide a CRIU >= 4.2 that works on this host, plus pycriu.
#
# 1. If the host's own `criu` is >= 4.2 and `criu check` passes, use it (prints its path).
# 2. Otherwise (e.g. Debian 12 on a kernel >= 6.16: its criu 3.17 fails on the vDSO) fetch criu and
#    python3-pycriu from a newer Debian suite into a private prefix, with their own libc, and point a
#    copy of the binary at that libc with patchelf. Nothing in the system is replaced.
#
# Idempotent: an existing working private install is kept.
set -euo pipefail

PREFIX=${VZPY_CRIU_PREFIX:-/opt/vzpy/criu}
SUITES=${VZPY_CRIU_SUITES:-"testing unstable"}
MIN_MAJOR=4 MIN_MINOR=2

version_ok() {  # $1 = criu binary
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9.]*\).*/\1/p') || return 1
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR)))
}

works() {  # $1 = criu binary
  version_ok "$1" && "$1" check >/dev/null 2>&1
}

if [ -x "$PREFIX/bin/criu" ] && works "$PREFIX/bin/criu" && [ -d "$PREFIX/pycriu/pycriu" ]; then
  echo "vzpy setup: private CRIU already installed: $("$PREFIX/bin/criu" --version | head -n1) at $PREFIX/bin/criu"
  exit 0
fi

host_criu=$(command -v criu || true)
host_pycriu=$(python3 -c 'import os, pycriu; print(os.path.dirname(pycriu.__file__))' 2>/dev/null || true)
if [ -n "$host_criu" ] && works "$host_criu" && [ -n "$host_pycriu" ]; then
  # vzpy looks in one place: link the host's binary and copy its pycriu there.
  mkdir -p "$PREFIX/bin" "$PREFIX/pycriu"
  ln -sf "$host_criu" "$PREFIX/bin/criu"
  rm -rf "$PREFIX/pycriu/pycriu" && cp -a "$host_pycriu" "$PREFIX/pycriu/pycriu"
  echo "host $("$host_criu" --version | head -n1)" >"$PREFIX/SOURCE"
  echo "vzpy setup: host CRIU is new enough and passes 'criu check': $host_criu"
  exit 0
fi

echo "vzpy setup: host CRIU missing, older than $MIN_MAJOR.$MIN_MINOR or failing 'criu check';" \
     "installing a private one into $PREFIX"
work=$(mktemp -d /tmp/vzpy-criu.XXXXXX)
trap 'rm -rf "$work"' EXIT

for suite in $SUITES; do
  apt_dir="$work/apt-$suite"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$work/debs"
  cat >"$apt_dir/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
SRC
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
            -o Dir::State::Status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o APT::Get::List-Cleanup=0)
  apt-get "${apt_opts[@]}" update -qq
  cand=$(apt-cache "${apt_opts[@]}" policy criu | sed -n 's/^ *Candidate: *//p')
  echo "vzpy setup: $suite has criu $cand"
  case "$cand" in
    ""|"(none)") continue ;;
  esac
  major=${cand%%.*}; rest=${cand#*.}; minor=${rest%%.*}
  ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR))) || continue

  # The dependency closure changes as the suite moves (libnet1 -> libnet9), so compute it.
  mapfile -t pkgs < <(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
      --no-conflicts --no-breaks --no-replaces --no-enhances criu python3-pycriu \
      | grep -E '^[a-z0-9][a-z0-9.+-]*$' | sort -u)
  # Python itself and the interpreter stack are not needed: pycriu is pure Python, used from our venv.
  keep=()
  for p in "${pkgs[@]}"; do
    case "$p" in
      python3|python3-minimal|python3.*|libpython3*|python3-protobuf|python3-pkg-resources|perl*|debconf*) ;;
      *) keep+=("$p") ;;
    esac
  done
  (cd "$work/debs" && apt-get "${apt_opts[@]}" download "${keep[@]}" >/dev/null)
  rm -rf "$PREFIX.new"
  mkdir -p "$PREFIX.new"
  for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$PREFIX.new/root"
  done
  libdir="$PREFIX.new/root/usr/lib/x86_64-linux-gnu"
  mkdir -p "$PREFIX.new/bin" "$PREFIX.new/pycriu"
  cp "$PREFIX.new/root/usr/sbin/criu" "$PREFIX.new/bin/criu"
  # --force-rpath: RUNPATH would not apply to indirect dependencies (e.g. libunistring).
  patchelf --set-interpreter "$PREFIX/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
           --force-rpath --set-rpath "$PREFIX/root/usr/lib/x86_64-linux-gnu" "$PREFIX.new/bin/criu"
  for d in pycriu crit; do
    [ -d "$PREFIX.new/root/usr/lib/python3/dist-packages/$d" ] &&
      cp -a "$PREFIX.new/root/usr/lib/python3/dist-packages/$d" "$PREFIX.new/pycriu/"
  done
  echo "$suite $cand" >"$PREFIX.new/SOURCE"
  [ -n "$libdir" ]
  rm -rf "$PREFIX.old"
  [ -e "$PREFIX" ] && mv "$PREFIX" "$PREFIX.old"
  mv "$PREFIX.new" "$PREFIX"
  rm -rf "$PREFIX.old"
  if works "$PREFIX/bin/criu"; then
    echo "vzpy setup: installed CRIU $cand from Debian $suite at $PREFIX/bin/criu"
    exit 0
  fi
  echo "vzpy setup: criu from $suite does not pass 'criu check' here:" >&2
  "$PREFIX/bin/criu" check 2>&1 | tail -n 5 >&2 || true
done
echo "vzpy setup: no usable CRIU >= $MIN_MAJOR.$MIN_MINOR found (tried: host, $SUITES)" >&2
exit 1
