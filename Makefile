# Quick start: `make demo` (set up, build the demo data, register its test pairs) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build on this machine; set TORCH="torch" (or a CUDA wheel spec) for a GPU install.
TORCH ?= torch==2.13.0

.PHONY: install test demo release clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,data]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check custom_nets tests
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m custom_nets demo_data --out_dir demo_data
	cd bundle && ../$(PY) -m monai.bundle run inference --config_file configs/inference.json \
		--dataset_dir ../demo_data --output_dir ../demo_out
	$(PY) -m custom_nets score --results demo_out --datalist demo_data/datalist.json

# Refresh bundle/large_files.yml (SHA-256 of bundle/models/model.pt) and pack dist/<bundle>_v<version>.zip.
release: install
	$(PY) -m custom_nets release --bundle_dir bundle --out_dir dist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_data demo_out
