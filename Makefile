# vzpy: `make demo` (sets up, then shows a CT's life) and `make test` (sets up, then runs every test).
VENV ?= /opt/vzpy/venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit lint bench clean
setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

unit: setup
	$(PY) -m pytest tests/unit -q

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: setup
	$(PY) bench/chkpnt
