# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned, so nothing resolves a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# MovieLens-100K ships inside this wheel; its dependencies are not wanted.
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	# Compile the numba kernels once (numba caches them beside the source).
	$(PY) -m fedshare.kernels
	touch $(STAMP)

# The main job; simulations/bench.py (MAIN_JOB) times exactly these commands.
demo: $(STAMP)
	$(VENV)/bin/fedshare data stats --dataset ml-100k
	$(VENV)/bin/fedshare run --config simulations/configs/fedshare.toml --set unlearn=true
	$(VENV)/bin/fedshare unlearning-table --seeds 0
	$(VENV)/bin/fedshare storage

test: $(STAMP)
	$(VENV)/bin/ruff check .
	# the layers of pyproject.toml's [tool.importlinter] contracts
	$(VENV)/bin/lint-imports
	# two workers: the tests that start processes on one, in order (tests/conftest.py)
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
