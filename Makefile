# kdml: `make train` sets up .venv and trains on the embedded glyph dataset;
# `make test` runs the test suite. Both work offline after the first install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdml-installed
TRAIN_ARGS ?=

.PHONY: install train test bench bench_methods clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,ann]"
	touch $(STAMP)

install: $(STAMP)

# Soft-orthogonal proxies (Proxy Anchor + SO) on the embedded glyphs; re-running
# continues (or just reports) the run.
train: $(STAMP)
	$(BIN)/python -m kdml.train --method=so_proxy --dataset=synthetic \
		--epochs=30 --eval_every=3 --output_dir=runs/default --resume $(TRAIN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/python tools/bench_speed.py

# Method comparison on Omniglot (OMNIGLOT=<dir with images_background_small*.zip>); cached per run.
bench_methods: $(STAMP)
	$(BIN)/python tools/bench_methods.py --rows=proxy_anchor,so_proxy $(BENCH_ARGS)

clean:
	rm -rf runs build *.egg-info
