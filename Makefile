# Two commands that work on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs gpujobs, runs the demo on the embedded default
#   make test   creates .venv, installs everything, runs lint, type check, tests and the docs build
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Everything the tests need: the runpod SDK (its local test server), the emulators, the docs, and
# the worker (CPU torch, pinned; its tests run a tiny random-weight model).
EXTRAS := dev,docs,worker

.PHONY: demo test lint typecheck pytest docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-$(EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

demo: install
	$(BIN)/python examples/demo.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint images/qwen-layered/Dockerfile

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest

docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint typecheck pytest docs

bench: install
	$(BIN)/python benches/client_overhead.py

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache demo-output
