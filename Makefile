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
# `make train` on a CPU machine: 2 processes (DDP over gloo) of one thread each use 2 cores better than one process
# of two threads; on a GPU machine, one process.
TRAIN_PROCS ?= $(if $(filter 1,$(HAVE_GPU)),1,2)

.PHONY: venv build train test clean

venv: $(VENV)/.deps
# The venv takes about 6.5 GB (torch's CUDA build and its libraries, DALI); a full disk fails the install part-way
# with pip's "No space left on device", so say so first. --no-cache-dir: no second copy of the wheels in pip's cache.
$(VENV)/.deps: requirements.txt
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$$free_kb" -lt 7500000 ]; then \
		echo "make: only $$((free_kb / 1024)) MB free here; the venv needs about 6.5 GB (free some disk and rerun)" >&2; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir -r requirements.txt
	touch $@

build: venv
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m detr_fast info

train: venv
	FORCE_CUDA=$(HAVE_GPU) $(MAKE) build
	OMP_NUM_THREADS=$(if $(filter 1,$(HAVE_GPU)),4,1) $(BIN)/torchrun --standalone --nproc_per_node=$(TRAIN_PROCS) \
		-m detr_fast train --config $(CONFIG)

test: venv
	$(MAKE) build
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build *.egg-info detr_fast/_C*.so
