# Two commands do everything on a fresh machine:  make reproduce   and   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.yaml
RUN     ?= runs/$(basename $(notdir $(CONFIG)))
# MNIST: use the shared offline copy where it exists, else ./data (downloaded by torchvision if online).
LAQFI_DATA_ROOT ?= $(if $(wildcard ../shared/data/MNIST/raw),../shared/data,data)
export LAQFI_DATA_ROOT
# Training from scratch with the released recipe instead of using checkpoints/default.safetensors.
SCRATCH_RUN := $(notdir $(RUN))_scratch
SCRATCH := --set baseline.weights=null --set run.name=$(SCRATCH_RUN)
TEST_WORKERS ?= $(shell $(PY) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
PYTEST_ALL = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests
STRATEGIES := whole_threshold.py layer_group.py layer_ratio.py layer_math.py
# Tables of the default config go into their docs page: $(call DOCS,results) -> --update-docs docs/results.md
DOCS = $(if $(filter configs/default.yaml,$(CONFIG)),--update-docs docs/$(1).md)

.PHONY: setup reproduce reproduce-from-scratch test test-avx2 test-quick bench compare full-eval learning-curve sensitivity actquant verify lowbit finetune sweep-cost experiments

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

setup: $(BIN)/.installed

# The poster's tables on the released baseline (verified by SHA-256, not retrained): Fisher, the four
# strategies, the report.
reproduce: setup
	$(BIN)/python simplediffusion.py --config $(CONFIG)
	for s in $(STRATEGIES); do $(BIN)/python $$s --config $(CONFIG) || exit 1; done
	$(BIN)/python -m common.report $(RUN) $(call DOCS,results)

# The same from an empty start: train the baseline with the released recipe (hours on 2 CPU cores;
# resumable: rerun with RESUME=--resume), then compare its fp32 metrics with the released weights' (evaluated
# first by `make reproduce`)..
reproduce-from-scratch: reproduce
	$(BIN)/python simplediffusion.py --config $(CONFIG) $(SCRATCH) $(RESUME)
	for s in $(STRATEGIES); do $(BIN)/python $$s --config $(CONFIG) $(SCRATCH) || exit 1; done
	$(BIN)/python -m common.report runs/$(SCRATCH_RUN) --compare-released $(RUN)

# One pytest worker per core (2 here), a whole test file per worker so its module fixtures run once;
# the slowest files first (tests/conftest.py SLOWEST_FILES), not xdist's order by test count.
# The end-to-end tests need MNIST (without it their fixture skips them and the suite would pass having run them
# not): fetched into LAQFI_DATA_ROOT by torchvision where it is missing and the network allows, else an error.
MNIST = $(BIN)/python -c "import os; from common.diffusion.data import load_mnist; \
	[load_mnist(os.environ['LAQFI_DATA_ROOT'], s, download=True) for s in ('train', 'test')]"

test: setup
	$(BIN)/ruff check .
	$(MNIST)
	$(PYTEST_ALL)

# The same suite computing like an AVX2-only CPU (no native bf16 / VNNI / AMX) on any x86 host: torch's own kernels
# at AVX2 width, oneDNN's (bf16 / int8 GEMMs and convolutions) capped at AVX2 (common/core/machine.py).
# Its own inductor cache: torch.compile's cache key does not see ATEN_CPU_CAPABILITY, and kernels compiled under
# one setting gave a NaN loss (or a crash) under the other (test_train's compiled step, 2026-12-07).
test-avx2: setup
	$(MNIST)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.pytest_cache/inductor_avx2 \
		$(PYTEST_ALL)

# The inner loop: unit tests only (everything not marked slow), on two workers like make test.
test-quick: setup
	$(MNIST)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/bench.py --config $(CONFIG) --n-batch 300 --backend-n 300 $(call DOCS,performance)

# What a poster-scale reproduce / compare costs on 1 and 8 GPUs (measured here, projected by FLOPs; docs/distributed.md).
sweep-cost: setup
	$(BIN)/python benchmarks/sweep_cost.py --config configs/poster.yaml --update-docs docs/distributed.md

# Beyond the poster: every importance metric through the same allocator (needs `make reproduce` first).
compare: setup
	$(BIN)/python compare_metrics.py --config $(CONFIG) $(call DOCS,compare)

# Full-rank FID (2,500 Inception images per variant) for fp32, uniform fp16 and layer ratio p=0.25.
full-eval: setup
	$(BIN)/python simplediffusion.py --config configs/full_eval.yaml
	$(BIN)/python layer_ratio.py --config configs/full_eval.yaml
	$(BIN)/python -m common.report runs/full_eval

# Learning curve of a from-scratch training run's EMA snapshots (after `make reproduce-from-scratch`; one seed).
learning-curve: setup
	$(BIN)/python learning_curve.py --config $(CONFIG) $(SCRATCH) --set "eval.seeds=[0]" $(call DOCS,baseline)

# Quantization sensitivity at three points of the released training run (snapshots under checkpoints/).
sensitivity: setup
	$(BIN)/python training_sensitivity.py --config $(CONFIG) --snapshots checkpoints/default_step*.safetensors checkpoints/default.safetensors $(call DOCS,baseline)

# Beyond the poster: weight + activation quantization, uniform vs Fisher/magnitude/random W/A plans and
# single vs per-timestep-group activation ranges at act_quant.budgets (needs `make reproduce` first).
actquant: setup
	$(BIN)/python act_quant.py --config $(CONFIG) $(call DOCS,actquant)

# Below 4 bits: sub-4-bit formats, chain-aware / iterative / learned sensitivities (needs `make reproduce` first).
lowbit: setup
	$(BIN)/python lowbit.py --config $(CONFIG) $(call DOCS,lowbit)

# W4A6 / W4A8 recovered by reconstruction and selective finetuning (Fisher choosing what to train), then W4A4's
# damage and ablation (w4a4.py); after `make reproduce`.
finetune: setup
	$(BIN)/python finetune.py --config $(CONFIG) $(call DOCS,finetune)
	$(BIN)/python w4a4.py --config $(CONFIG) $(call DOCS,finetune)

# Every experiment on one config, in pipeline order (after a new release: ~2 h for configs/dit.yaml on 2 cores),
# then the run folder checked.
experiments: reproduce compare actquant lowbit finetune bench verify

# Whether runs/<run> is intact: every recorded hash and cross-reference (read-only; exit 1 on a problem).
verify: setup
	$(BIN)/python -m common.verify $(RUN)
