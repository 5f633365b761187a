# `make quickstart` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup test test-all test-oldest lint quickstart reproduction reproduction-table1 bench clean

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

# The oldest versions pyproject.toml admits, on the tests of adapters, decoding and profiling.
# torch 2.13 is the oldest CPU build obtainable here (PyPI's Linux torch wheels are CUDA builds
# of several GB, and the PyTorch CPU index is unreachable); torch 2.11 ran unchanged on a GPU.
OLDEST := transformers==5.0.0 peft==0.19.0
OLDEST_TESTS := tests/test_queryable_model.py tests/test_queryable_decode.py \
	tests/test_adapter_contract.py tests/test_peft_baselines.py tests/test_profile_backbones.py
test-oldest:
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install -q --upgrade pip
	.venv-oldest/bin/pip install -q torch==2.13.0
	.venv-oldest/bin/pip install -q -e '.[dev]' $(OLDEST)
	.venv-oldest/bin/python -c "import torch, transformers, peft; print('oldest:', torch.__version__, transformers.__version__, peft.__version__)"
	HF_HUB_OFFLINE=1 .venv-oldest/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

lint: setup
	$(BIN)/ruff check qlsearch tests

# The quickstart study on CPU (nothing downloaded); --resume makes a second run a no-op.
quickstart: setup
	HF_HUB_OFFLINE=1 $(BIN)/qlsearch sweep studies/quickstart.toml --resume
	$(BIN)/qlsearch status quickstart
	$(BIN)/qlsearch report quickstart

# The paper's synthetic tables at CPU scale (reports/reproduction/protocol.md): each family's
# sweep resumes (a finished one is a no-op), then the page is rebuilt from the runs. Not in CI.
# RAY_CHDIR_TO_TRIAL_DIR=0: trials find the shared backbone cache (runs/cache) from the
# checkout, not from a per-trial working directory.
# The transformer family (reproduction-table1) is hours on a CPU: its own target.
reproduction: setup
	RAY_CHDIR_TO_TRIAL_DIR=0 HF_HUB_OFFLINE=1 $(BIN)/qlsearch sweep studies/reproduction-deep --resume --num-cpus 6
	$(BIN)/python -m qlsearch.report.reproduction

reproduction-table1: setup
	RAY_CHDIR_TO_TRIAL_DIR=0 HF_HUB_OFFLINE=1 $(BIN)/qlsearch sweep studies/reproduction-table1 --resume
	$(BIN)/python -m qlsearch.report.reproduction

# The routed-adapter benchmarks of benchmarks/README.md on this machine (all but the batch-8 run).
bench: setup
	$(BIN)/qlsearch profile --model benchmarks/configs/launch-bound \
		--methods lora,dora,replora,hyra,doran,queryable,instr-queryable \
		--batch 1 --seq 1 --threads 1 --repeats 40 --out benchmarks/results/launch-bound
	$(BIN)/qlsearch profile --model benchmarks/configs/launch-bound --dtype bfloat16 \
		--methods lora,dora,replora,hyra,doran,queryable,instr-queryable \
		--batch 1 --seq 1 --threads 1 --repeats 40 --out benchmarks/results/launch-bound --tag cpu-1t-bf16
	$(BIN)/qlsearch profile --model benchmarks/configs/qwen2.5-0.5b --methods lora,queryable,instr-queryable \
		--batch 1 --seq 128 --skip train --repeats 5 --warmup 1 --threads 1 --out benchmarks/results/qwen2.5-0.5b
	$(BIN)/qlsearch profile --model benchmarks/configs/qwen2.5-0.5b --methods lora,queryable,instr-queryable \
		--batch 1 --seq 128 --skip decode,flops --repeats 5 --warmup 1 --threads 2 \
		--out benchmarks/results/qwen2.5-0.5b
	$(BIN)/qlsearch profile --model benchmarks/configs/launch-bound \
		--methods lora,dora,replora,hyra,doran,moelora,queryable,instr-queryable --batch 1 --seq 128 \
		--dtype bfloat16 --skip decode,train --repeats 1 --warmup 0 --threads 2 \
		--out benchmarks/results/kernels --tag launch-bound-bf16-b1-s128

clean:
	rm -rf $(VENV) .venv-oldest .pytest_cache .ruff_cache
