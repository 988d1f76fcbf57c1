# Every target installs what it needs into .venv first; re-running reuses it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.emdask-installed

.PHONY: install test test-all demo bench clean

KERNELS := setup.py $(wildcard emdask/families/_csrc/*.c emdask/families/_csrc/*.h)

# The install (editable) builds the C kernels beside their sources; a change to them builds
# them again.
$(STAMP): pyproject.toml $(KERNELS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 tests

# and the tests marked slow
test-all: $(STAMP)
	$(PY) -m pytest -q --durations=20 -m "slow or not slow" tests

demo: $(STAMP)
	$(PY) -m pipelines.cli demo

bench: $(STAMP)
	$(PY) benchmarks/gmm_vs_sklearn.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache emdask/families/*.so
