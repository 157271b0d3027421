# Two entry points for a fresh machine (see README "Quick start"):
#   make demo   -> install, then run the embedded default (CPU demo)
#   make test   -> install, then run the test suite (what CI runs)
#   make test-fast -> the tests that spawn no process (no CLI subprocess, DDP, SLURM, S3), for the edit-test loop
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-cpu demo test test-fast lint bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,eval]"
	touch $@

install: $(VENV)/.installed

# Laptops: torch from PyTorch's CPU wheel index (no CUDA libraries), then the same pinned install.
install-cpu:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch==2.14.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(VENV)/.installed

demo: install
	$(VENV)/bin/midtrain demo --out demo_out

# Two xdist workers for everything but the SLURM tests (each test process is single-threaded), then those alone:
# their jobs assume the node's two CPUs are free. Exit status 5 = they were all skipped (no cluster; see .ci/run).
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slurm"
	$(PY) -m pytest -q -m slurm || [ $$? -eq 5 ]

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check midtrain tests benchmarks

bench: install
	$(PY) benchmarks/loader.py
