# radmark developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair that installs from this machine's disk; override elsewhere (TORCH_PINS=).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
TABLE ?= fashion_mnist

.PHONY: help install data test test-full lint clean demo reproduce-table calibrate bench-marking bench-train

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_PINS)" ]; then $(PY) -m pip install -q $(TORCH_PINS); fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed data  ## create .venv, install radmark (+dev tools) and the data it can get

data: $(VENV)/.installed  ## fetch Fashion-MNIST (Debian package as root, else torchvision download)
	@bash scripts/get_data.sh $(PY)

test: $(VENV)/.installed  ## fast test suite (a few minutes on 2 cores)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-full: $(VENV)/.installed  ## everything, slow end-to-end tests included
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed  ## ruff + mypy
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

clean:  ## remove caches and run outputs (keeps .venv and data/)
	rm -rf outputs multirun cache .pytest_cache .ruff_cache .mypy_cache wandb
	find . -name __pycache__ -prune -exec rm -rf {} +
