# Set-up is part of every target: a fresh clone needs only Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup run test lint bench bench-quality bench-fewshot lightfm scann-sources clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,beam]'
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tfrs-coldstart run $(ARGS)

# Two pytest workers (pytest-xdist), one test file each at a time so a file's fixtures are built
# once: most tests are single-threaded Python around TensorFlow, so the 2 cores finish the suite
# in ~10 minutes instead of ~15. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check tfrs_coldstart tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

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

# Streamed against in-memory input at 1M, 5M and 20M interactions (issue 16): peak RSS and
# examples/s, each size in its own process at nice 19; about 300 MB of shards in /tmp.
.PHONY: bench-scale
bench-scale: $(STAMP)
	nice -n 19 $(BIN)/python benchmarks/scale.py $(ARGS)

# The sources the ScaNN image is built from (TF Serving at its release tag; google-research at the
# ScaNN 1.4.2 release, scann/ only), for tests/test_scann_build.py, which runs
# serving/scann/patch_tf_serving.py against them. Keep SCANN_COMMIT equal to the Dockerfile's.
SOURCES ?= ../sources
TF_SERVING_TAG ?= 2.20.0
SCANN_COMMIT ?= 634a79fb5b4b23237a81eac028d27b5d34a5dba4

scann-sources:
	@test -d $(SOURCES)/serving-$(TF_SERVING_TAG) || git -c advice.detachedHead=false clone -q \
	  --depth 1 --branch $(TF_SERVING_TAG) https://github.com/tensorflow/serving.git \
	  $(SOURCES)/serving-$(TF_SERVING_TAG)
	@test -d $(SOURCES)/google-research-scann || { \
	  rm -rf $(SOURCES)/google-research-scann.tmp && \
	  mkdir -p $(SOURCES)/google-research-scann.tmp && cd $(SOURCES)/google-research-scann.tmp && \
	  git init -q && \
	  git remote add origin https://github.com/google-research/google-research.git && \
	  git sparse-checkout init --cone && git sparse-checkout set scann && \
	  git fetch -q --depth 1 --filter=blob:none origin $(SCANN_COMMIT) && \
	  git checkout -q FETCH_HEAD && cd - >/dev/null && \
	  mv $(SOURCES)/google-research-scann.tmp $(SOURCES)/google-research-scann; }
	@echo "TF Serving $(TF_SERVING_TAG): $(SOURCES)/serving-$(TF_SERVING_TAG)"
	@echo "ScaNN (google-research $(SCANN_COMMIT)): $(SOURCES)/google-research-scann/scann"

clean:
	rm -rf runs .pytest_cache
