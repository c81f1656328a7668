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
	$(VENV)/bin/ruff check src tests bench experiments
	$(VENV)/bin/mypy

clean:  ## remove caches and run outputs (keeps .venv and data/)
	rm -rf outputs multirun cache .pytest_cache .ruff_cache .mypy_cache wandb
	find . -name __pycache__ -prune -exec rm -rf {} +

bench-train: $(VENV)/.installed  ## victim training throughput: Lightning loop vs bare PyTorch loop
	$(PY) bench/bench_train.py $(BENCH_ARGS)

demo: install  ## the main job on Fashion-MNIST (best variant), <= 10 min on 2 cores, with a plain summary
	$(PY) -m radmark.run +experiment=demo hydra.run.dir=outputs/demo

TABLE_SWEEP = multirun/table_$(TABLE)
reproduce-table: install  ## the paper-style table (TABLE=fashion_mnist on CPU; TABLE=cifar10|imagefolder on a GPU)
	@start=$$(date +%s); \
	$(PY) -m radmark.run -m +experiment=table_$(TABLE) hydra.sweep.dir=$(TABLE_SWEEP) $(TABLE_ARGS) && \
	$(PY) -m radmark.report --runs $(TABLE_SWEEP) --name $(TABLE) \
	  --command "make reproduce-table TABLE=$(TABLE) $(TABLE_ARGS)" \
	  --notes "Wall time of the sweep: $$(( $$(date +%s) - start )) s on $$(nproc) CPU cores / $$(python3 -c 'import platform; print(platform.processor() or platform.machine())')."

# Small data so that it runs in a few minutes on 2 cores; override CALIBRATE_ARGS for a bigger check and
# CALIBRATE_EXTRA to calibrate a variant (e.g. CALIBRATE_EXTRA="marking=strong detection=probes").
CALIBRATE_ARGS ?= data.splits.public=600 data.splits.private=400 data.splits.heldout=300 data.splits.test=200 \
	marking.fraction=0.25 marking.steps=10 marking.network.epochs=2 victim.epochs=2 victim.batch_size=64 \
	detection.n_heldout=300 detection.calibration_keys=200 logger=none trainer.enable_progress_bar=false
calibrate: $(VENV)/.installed  ## p-value calibration under H0: KS vs U(0,1), FPR at 0.05/0.01, histogram PNG
	$(PY) -m radmark.detection.calibrate $(CALIBRATE_ARGS) $(CALIBRATE_EXTRA) hydra.run.dir=outputs/calibrate/$$(date +%Y-%m-%d_%H-%M-%S)

bench-marking: $(VENV)/.installed  ## marking throughput vs bare forward+backward of the marking net (bench/results/)
	$(PY) bench/bench_marking.py $(BENCH_ARGS)
