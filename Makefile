# `make install` creates .venv with the tested sequence; it is idempotent (a stamp
# file records the requirements that were installed).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "setuptools>=77.0.3,<81" wheel
	$(BIN)/pip install -q --no-build-isolation -r requirements.txt
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Two pytest-xdist workers, one intra-op thread each (tests/conftest.py); a module runs on one
# worker (its module fixtures are built once). `make test WORKERS=0`: one process.
WORKERS ?= 2
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadscope

test: install
	$(PYTEST) -m "not slow" tests

test-all: install
	$(PYTEST) tests

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info

# The GPU path. `make gpu-wheels` (here, with network): the wheels a bare GPU machine lacks
# (gpu/requirements.txt) into gpu/wheels/, checked; not committed, carried to a GPU session.
# `make gpu-check OUT=dir` (on the GPU machine, with its own python3, no .venv): the CUDA tests
# and the GPU benchmarks in about 8 minutes; results only under OUT, summary.md first.
GPU_PY ?= python3

.PHONY: gpu-wheels gpu-check

gpu-wheels: install
	$(BIN)/python gpu/fetch_wheels.py

gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=dir"; exit 2; }
	@$(GPU_PY) scripts/gpu_check.py "$(OUT)"
