# Every target installs what it needs into .venv first; re-running reuses it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.emdask-installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m pipelines.cli demo

bench: $(STAMP)
	$(PY) benchmarks/gmm_vs_sklearn.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
