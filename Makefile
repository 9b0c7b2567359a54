# cellmask: every target installs what it needs (into .venv) by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cellmask-installed
DATA   ?= data/synthetic

.PHONY: setup demo test lint format bench synth clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The whole pipeline on a CPU in minutes: synthetic data -> train -> predict -> score -> submission.
demo: setup
	$(BIN)/cellmask demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python benchmarks/bench_metric.py

synth: setup
	$(BIN)/cellmask synth $(DATA)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
