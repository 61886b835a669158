# make demo: set up .venv, then synthesise data → train → evaluate → export → predict.
# make test: set up .venv, then run the test suite (make test-fast: the unit tests only).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mtrec-installed
# where the CPU build of torch comes from when no local wheel is configured
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo_out

.PHONY: help venv test test-fast demo lint bench docs clean

help:
	@echo "make demo   # end-to-end: synthetic data -> train -> evaluate -> export -> predict"
	@echo "make test   # the test suite"
	@echo "make test-fast  # unit tests only, ~70 s (no Ray, Serve, Docker lint, tutorial, fresh processes)"
	@echo "make lint   # ruff"
	@echo "make bench  # benchmarks (JSON lines)"
	@echo "make docs   # regenerate docs/configuration.md from the config schema"

venv: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/torch.txt requirements/torchrec.txt requirements/dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || \
	  { echo "mtrec needs Python 3.11 (the pinned torch/fbgemm/torchrec wheels); found $$($(PYTHON) --version 2>&1) at '$(PYTHON)'. Run: make PYTHON=/path/to/python3.11 ..."; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, CPU build only: a local wheel if pip is configured with one, else the CPU index
	$(PIP) install -q -r requirements/torch.txt || \
	  $(PIP) install -q -r requirements/torch.txt --extra-index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q -r requirements/cpu.txt -r requirements/dev.txt
	$(PIP) install -q --no-deps -r requirements/torchrec.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, fbgemm_gpu, torchrec, polars, ray; print('mtrec env ok: torch', torch.__version__)"
	@touch $(STAMP)

test: venv
	$(PY) -m pytest -q

# tests marked `integration` (pyproject.toml) are left out
test-fast: venv
	$(PY) -m pytest -q -m "not integration"

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	bash scripts/demo.sh $(DEMO_DIR)

bench: venv
	$(PY) bench/loader.py
	$(PY) bench/train.py

docs: venv
	$(PY) -m mtrec.docs --out docs/configuration.md

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
