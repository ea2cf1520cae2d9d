#!/usr/bin/env bash
# `make setup`: everything vzpy needs on a Debian 12 host, idempotent, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VZPY_VENV:-/opt/vzpy/venv}
CRIU_PREFIX=${VZPY_CRIU_PREFIX:-/opt/vzpy/criu}

if [ "$(id -u)" != 0 ]; then
  echo "vzpy setup: run as root (containers need namespaces, cgroups and CRIU)" >&2
  exit 12
fi

bash scripts/install-apt-deps.sh
VZPY_CRIU_PREFIX=$CRIU_PREFIX bash scripts/install-criu.sh

if [ ! -x "$VENV/bin/python" ]; then
  echo "vzpy setup: creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
# pycriu is not on PyPI: put the copy install-criu.sh made on the virtualenv's path.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$CRIU_PREFIX/pycriu" >"$site/vzpy-pycriu.pth"
"$VENV/bin/python" -c 'import pycriu, vzpy' || { echo "vzpy setup: pycriu or vzpy not importable" >&2; exit 1; }
ln -sf "$VENV/bin/vzpy" /usr/local/sbin/vzpy

# vzpy also answers to vzctl, vzlist and vzmigrate (it reads their syntax when invoked under those names):
# links in /usr/local/sbin, each only where no real one is installed, so a real OpenVZ tool is never
# shadowed. VZPY_VZCTL_NAMES=no skips this.
ours() { [ -L "$1" ] && [ "$(readlink "$1")" = "$VENV/bin/vzpy" ]; }
real_tool() {  # a program of that name that is not our link, on PATH or in the usual places
  local name=$1 path
  for path in $(type -ap "$name") /usr/sbin/"$name" /sbin/"$name" /usr/bin/"$name" /bin/"$name"; do
    if [ -e "$path" ] && ! ours "$path" && [ "${path#"$VENV"/bin/}" = "$path" ]; then
      echo "$path"
      return 0
    fi
  done
  return 1
}
if [ "${VZPY_VZCTL_NAMES:-yes}" != no ]; then
  for name in vzctl vzlist vzmigrate; do
    link=/usr/local/sbin/$name
    if real=$(real_tool "$name"); then
      if ours "$link"; then rm -f "$link"; fi
      echo "vzpy setup: $real exists: not shadowed, no $link link (use \`vzpy\` for vzpy)"
    else
      ln -sfn "$VENV/bin/vzpy" "$link"
      echo "vzpy setup: $link -> vzpy (vzpy answers to $name's syntax; VZPY_VZCTL_NAMES=no skips it)"
    fi
  done
fi
VZPY_VENV=$VENV bash scripts/install-extras.sh
echo "vzpy setup: done; $(command -v vzpy) -> $VENV/bin/vzpy"
