# kdml: `make train` sets up .venv and trains on the embedded glyph dataset;
# `make test` runs the whole test suite (what CI runs), `make test-fast` all but the
# tests marked `large` or `slow` (docs/development.md). Offline after the first install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdml-installed
TRAIN_ARGS ?=

.PHONY: install train test test-fast bench bench_methods bench_losses bench_pooling clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet -e ".[test,ann]"
	touch $(STAMP)

install: $(STAMP)

# Soft-orthogonal proxies (Proxy Anchor + SO) on the embedded glyphs; re-running
# continues (or just reports) the run.
train: $(STAMP)
	$(BIN)/python -m kdml.train --method=so_proxy --dataset=synthetic \
		--epochs=30 --eval_every=3 --output_dir=runs/default --resume $(TRAIN_ARGS)

# pytest exits 5 when it collects no test: that fails here too, with a message.
PYTEST = $(BIN)/python -m pytest -n 2
NO_TESTS = { status=$$?; [ $$status -ne 5 ] || echo "pytest collected no tests (exit 5)" >&2; exit $$status; }

test: $(STAMP)
	$(PYTEST) tests || $(NO_TESTS)

test-fast: $(STAMP)
	$(PYTEST) -m "not large and not slow" tests || $(NO_TESTS)

bench: $(STAMP)
	$(BIN)/python tools/bench_speed.py

# Method comparison on Omniglot (python -m kdml.benchmark, docs/benchmarks.md):
# make bench_methods OMNIGLOT=<dir with images_background_small{1,2}.zip> [BENCH_ARGS=...].
# Every run is cached in docs/results/omniglot/runs/, so a rerun resumes.
bench_methods: $(STAMP)
	@test -n "$(OMNIGLOT)" || { echo "error: pass OMNIGLOT=<folder holding images_background_small1.zip and images_background_small2.zip>" >&2; exit 2; }
	$(BIN)/python -m kdml.benchmark run --preset=omniglot --omniglot_dir=$(OMNIGLOT) $(BENCH_ARGS)

# The leaderboard of every objective (preset omniglot_losses: 342 runs, about 16 hours on
# 2 cores at the 26-epoch budget; docs/benchmarks.md).
bench_losses: $(STAMP)
	@test -n "$(OMNIGLOT)" || { echo "error: pass OMNIGLOT=<folder holding images_background_small1.zip and images_background_small2.zip>" >&2; exit 2; }
	$(BIN)/python -m kdml.benchmark run --preset=omniglot_losses --omniglot_dir=$(OMNIGLOT) \
	    --results_dir=docs/results/omniglot_losses $(BENCH_ARGS)

# GeM pooling against average + max (preset omniglot_pooling: 26 runs, 2 to 3 hours).
bench_pooling: $(STAMP)
	@test -n "$(OMNIGLOT)" || { echo "error: pass OMNIGLOT=<folder holding images_background_small1.zip and images_background_small2.zip>" >&2; exit 2; }
	$(BIN)/python -m kdml.benchmark run --preset=omniglot_pooling --omniglot_dir=$(OMNIGLOT) \
	    --results_dir=docs/results/omniglot_pooling $(BENCH_ARGS)

clean:
	rm -rf runs build *.egg-info
