# `make train`: set up everything on a fresh machine, train on the built-in shapes dataset, evaluate, print AP.
# `make test`:  the same set-up, then the test suite (CUDA tests are skipped where there is no GPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/shapes.yaml
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
export MAX_JOBS ?= $(shell nproc)
# CUDA kernels are compiled for `make test` wherever nvcc exists (CI checks that they build); `make train` skips them on a machine
# without a GPU, where they could not run anyway.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: venv build train test clean

venv: $(VENV)/.deps
$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

build: venv
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m detr_fast info

train: venv
	FORCE_CUDA=$(HAVE_GPU) $(MAKE) build
	$(BIN)/python -m detr_fast train --config $(CONFIG)

test: venv
	$(MAKE) build
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build *.egg-info detr_fast/_C*.so
