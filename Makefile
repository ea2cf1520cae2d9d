# vzpy: `make demo` (sets up, then shows a CT's life) and `make test` (sets up, then runs every test).
VENV ?= /opt/vzpy/venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit lint bench bench-peers clean mutation lab-image lab-up lab-down lab-demo
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

# What bench/chkpnt compares with (Podman 4.3 with runc, from Debian; configured per run by bench/peers.py).
bench-peers: setup
	bash scripts/install-bench-peers.sh

# Mutation testing of one module against its unit tests (minutes, so not in `make test`):
#   make mutation MODULE=criu/options.py
mutation: setup
	bash scripts/mutation.sh $(MODULE)

# The VM lab (vzpy_lab.vm: QEMU guests with Debian 12's stock kernel, for pre-copy and post-copy tests). Its
# tests (tests/integration/lab) run with `make test`; these build the cached image ahead of time, or keep a
# lab up by hand for poking at it (`make lab-up` prints how to reach it; `make lab-down` or ^C stops it).
lab-image: setup
	bash scripts/lab-image.sh

lab-up: setup
	PYTHONPATH=src $(PY) -m vzpy_lab.vm.lab up

lab-down: setup
	PYTHONPATH=src $(PY) -m vzpy_lab.vm.lab down

# Boots the lab, then moves a CT vm1 -> vm2 with pre-copy and back with post-copy (prints `lab-json:` lines).
lab-demo: setup
	PYTHONPATH=src $(PY) -m vzpy_lab.vm.demo
