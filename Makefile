# Quick start: `make test` (set up and run the tests). `make demo` arrives with the demo data and the bundle.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build on this machine; set TORCH="torch" (or a CUDA wheel spec) for a GPU install.
TORCH ?= torch==2.13.0

.PHONY: install test clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check custom_nets tests
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
