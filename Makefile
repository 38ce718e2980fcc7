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

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" tests

test-all: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
