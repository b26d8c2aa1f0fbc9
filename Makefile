# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject): 2.13.0 is the CPU build; an unpinned torch pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo demo-online test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,all]' $(TORCH_PIN)
	touch $@

venv: $(VENV)/.installed

demo: venv
	rm -rf runs/demo
	$(PY) -m preftune demo --output-dir runs/demo

demo-online: venv
	rm -rf runs/demo/run_online
	$(PY) -m preftune demo --online --output-dir runs/demo

# One test process per core (pytest-xdist; an idle one takes tests queued for the other), one thread each;
# the 15 slowest tests are listed at the end.
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=15 tests

test: venv
	$(PY) -m ruff check preftune tests benchmarks
	$(PYTEST)

# The edit-test loop: every test but the end-to-end ones marked slow (under a minute).
test-fast: venv
	$(PYTEST) -m "not slow"

lint: venv
	$(PY) -m ruff check preftune tests benchmarks
	$(PY) -m ruff format --check preftune tests benchmarks

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/bench_dpo.py --output runs/bench/bench_dpo.json

clean:
	rm -rf $(VENV) runs .pytest_cache
