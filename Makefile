# Set-up is part of every target: a fresh clone needs only Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup run test lint bench bench-quality bench-fewshot lightfm clean

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

# LightFM (the peer baseline) only builds through pip's legacy setup.py path (its setup.py
# writes to __builtins__), which pip < 24 still has.
lightfm: $(STAMP)
	@$(BIN)/python -c "import lightfm" 2>/dev/null || { \
	  $(BIN)/python -m pip install --quiet cython scipy wheel "pip<24" "setuptools<70" && \
	  $(BIN)/python -m pip install --quiet --no-use-pep517 --no-build-isolation lightfm && \
	  $(BIN)/python -m pip install --quiet --upgrade pip; }

bench-quality: lightfm
	$(BIN)/python benchmarks/coldstart.py $(ARGS)

# Few-shot cold users (issue 17); the ALS peer needs `implicit` (skipped when absent).
bench-fewshot: $(STAMP)
	@$(BIN)/python -c "import implicit" 2>/dev/null || $(BIN)/python -m pip install --quiet implicit || true
	OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/fewshot.py --seeds 3 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
