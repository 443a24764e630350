# Two commands do everything on a fresh machine:  make reproduce   and   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= configs/default.yaml
RUN     ?= runs/$(basename $(notdir $(CONFIG)))
# MNIST: use the shared offline copy where it exists, else ./data (downloaded by torchvision if online).
LAQFI_DATA_ROOT ?= $(if $(wildcard ../shared/data/MNIST/raw),../shared/data,data)
export LAQFI_DATA_ROOT

.PHONY: setup reproduce test bench compare actquant

$(BIN)/.installed: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

setup: $(BIN)/.installed

reproduce: setup
	$(BIN)/python simplediffusion.py --config $(CONFIG)
	$(BIN)/python whole_threshold.py --config $(CONFIG)
	$(BIN)/python layer_group.py --config $(CONFIG)
	$(BIN)/python layer_ratio.py --config $(CONFIG)
	$(BIN)/python layer_math.py --config $(CONFIG)
	$(BIN)/python -m common.report $(RUN) $(if $(filter configs/default.yaml,$(CONFIG)),--update-readme README.md)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/bench.py --config $(CONFIG) $(if $(filter configs/default.yaml,$(CONFIG)),--update-readme README.md)

# Beyond the poster: every importance metric through the same allocator (needs `make reproduce` first).
compare: setup
	$(BIN)/python compare_metrics.py --config $(CONFIG) $(if $(filter configs/default.yaml,$(CONFIG)),--update-readme README.md)

# Beyond the poster: weight + activation quantization, uniform vs Fisher/magnitude/random W/A plans and
# single vs per-timestep-group activation ranges at act_quant.budgets (needs `make reproduce` first).
actquant: setup
	$(BIN)/python act_quant.py --config $(CONFIG) $(if $(filter configs/default.yaml,$(CONFIG)),--update-readme README.md)
