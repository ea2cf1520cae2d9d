# vzpy: `make demo` (sets up, then shows a CT's life) and `make test` (sets up, then runs every test).
VENV ?= /opt/vzpy/venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit lint bench clean mutation
setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

unit: setup
	$(PY) -m pytest tests/unit -q

# ruff on every Python file; mypy (strict, configured in pyproject.toml) on src/.
lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/chkpnt

# Mutation testing of one module against its unit tests (minutes, so not in `make test`):
#   make mutation MODULE=criu/options.py
mutation: setup
	bash scripts/mutation.sh $(MODULE)
