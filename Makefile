# `make demo` and `make test` work from a fresh clone: each creates .venv when
# it is missing, installing torch 2.13.0 (CPU wheel) first, then the project.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CLINC150 from ../shared/data when it is there; otherwise the loader downloads it once.
ifeq ($(origin DRIFTLOOP_DATA), undefined)
ifneq ($(wildcard ../shared/data/clinc150/data_full.json),)
export DRIFTLOOP_DATA := $(abspath ../shared/data)
endif
endif
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-quick test test-fast install clean

$(BIN)/driftloop: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(BIN)/driftloop

demo: install
	$(BIN)/driftloop demo --config config/demo.yaml

demo-quick: install
	$(BIN)/driftloop demo --config config/demo.yaml --quick

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf state
