# `make quickstart` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup test test-all lint quickstart bench clean

# The CPU build of torch first: a bare `torch` requirement would pull GBs of CUDA wheels.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: setup  # includes the @pytest.mark.slow tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check qlsearch tests

# Until the quickstart sweep lands, the main job is the routed-adapter benchmark on the
# launch-bound stand-in (random weights from a shipped config: nothing is downloaded).
quickstart: setup
	HF_HUB_OFFLINE=1 $(BIN)/qlsearch profile --model benchmarks/configs/launch-bound \
		--methods lora,queryable,instr-queryable --batch 1 --seq 1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
