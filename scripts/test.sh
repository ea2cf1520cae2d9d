#!/usr/bin/env bash
# `make test`: lint (ruff, mypy), then every test (unit + integration with real CTs and real CRIU).
# As root, a real test that would skip (no root, no CRIU) fails instead: VZPY_REQUIRE_REAL=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VZPY_VENV:-/opt/vzpy/venv}
if [ "$(id -u)" = 0 ]; then
  export VZPY_REQUIRE_REAL=1
fi
"$VENV/bin/ruff" check src tests bench scripts
"$VENV/bin/ruff" format --check src tests bench scripts
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest tests -p no:cacheprovider "$@"
