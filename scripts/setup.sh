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
echo "vzpy setup: done; $(command -v vzpy) -> $VENV/bin/vzpy"
