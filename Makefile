# Set-up is part of every target: a fresh clone needs only Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup run test lint bench bench-quality clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,beam]'
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tfrs-coldstart run $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check tfrs_coldstart tests benchmarks
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tfrs_coldstart tests benchmarks

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/coldstart.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
