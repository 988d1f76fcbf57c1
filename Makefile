# Every target installs what it needs into .venv first; re-running reuses it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.emdask-installed

.PHONY: install warm test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Compile the kernels in this process (or find them in numba's cache) so that no Dask
# worker has to compile them on its first pass.
warm: $(STAMP)
	$(PY) -m emdask.warm

test: warm
	$(PY) -m pytest -q --durations=20 tests

demo: warm
	$(PY) -m pipelines.cli demo

bench: warm
	$(PY) benchmarks/gmm_vs_sklearn.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
