# tmlib: two commands do all the set-up on a fresh machine.
#   make test       create the environment if needed, fetch the data, run the test suite (notebooks included)
#   make reproduce  create the environment, fetch the data, train/cache models, run every notebook, write figures/
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick
PYTEST_ARGS ?=
# glibc keeps the forwards' large freed blocks instead of unmapping them (see tmlib/allocator.py):
# 1.3-1.5x faster passes, each process keeping its peak memory.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 2147483647

.PHONY: env data test reproduce bench lint lock clean

$(STAMP): pyproject.toml requirements-lock.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade "pip==26.3"
	$(PYTHON) -m pip install -c requirements-lock.txt -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

data: env
	$(PYTHON) -m tmlib.data fetch mnist
	@# Fashion-MNIST comes from Debian's dataset-fashion-mnist (or torchvision with a network);
	@# without it notebook 03 measures MNIST only and says so.
	@$(PYTHON) -m tmlib.data fetch fashion-mnist --no-download 2>/dev/null \
	  || echo "note: Fashion-MNIST not found (apt-get install dataset-fashion-mnist); notebook 03 will skip it"

test: env data
	$(PYTHON) -m pytest $(PYTEST_ARGS)

reproduce: env data
	$(PYTHON) -m tmlib.reproduce --profile $(PROFILE)

bench: env data
	$(PYTHON) benchmarks/bench_engine.py
	$(PYTHON) benchmarks/bench_measures.py
	$(PYTHON) benchmarks/bench_geed.py
	$(PYTHON) benchmarks/bench_jackknife.py
	$(PYTHON) benchmarks/bench_distributed.py
	$(PYTHON) benchmarks/bench_lie.py
	$(PYTHON) benchmarks/bench_layers.py
	$(PYTHON) benchmarks/bench_explorer.py

lint: env
	$(VENV)/bin/ruff check tmlib tests benchmarks

lock: env
	$(PYTHON) -m pip freeze --exclude-editable | sed '1i # Full pin set (pip freeze). Regenerate with `make lock`.' > requirements-lock.txt

clean:
	rm -rf $(VENV) results .pytest_cache
