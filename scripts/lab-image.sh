#!/usr/bin/env bash
# `make lab-image`: build (or verify the cached) guest image of the VM lab (vzpy_lab.vm), as root.
# The image lives in ${VZPY_LAB_CACHE:-/var/cache/vzpy-lab}, keyed by its recipe: a changed recipe rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VZPY_VENV:-/opt/vzpy/venv}
exec env PYTHONPATH=src "$VENV/bin/python" -m vzpy_lab.vm.image "$@"
