# Quick start: `make demo` (set up, build the demo data, register its test pairs) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build on this machine; set TORCH="torch" (or a CUDA wheel spec) for a GPU install.
TORCH ?= torch==2.13.0
# The MONAI Label app (monailabel_app/) runs in its own venv: monailabel needs torchvision and older numpy / pydicom
# (setup.cfg extra "label" holds the versions that install together).
LABEL_VENV ?= .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python
STUDIES ?= studies
LABEL_PORT ?= 8000

# Free disk (GB) each venv install needs, measured on fresh installs: .venv 3.5 GB, .venv-label 8.2 GB (monailabel
# needs torchvision, hence a CUDA build of torch). Checked before creating a venv (not when updating one), on the disk
# the venv goes to, so a full disk fails at once, saying so.
VENV_GB ?= 4
LABEL_VENV_GB ?= 9
define check_free_disk
	@dir=$$(dirname "$(abspath $(2))"); free=$$(df -Pk "$$dir" | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ ! -x "$(2)/bin/python" ] && [ "$$free" -lt "$(1)" ]; then \
		echo "error: installing $(2) needs about $(1) GB of free disk; $$free GB are free on the disk of $$dir." >&2; \
		exit 1; fi
endef

.PHONY: install label-install label-serve test demo release clean bench bench-quick bench-weights bench-memory \
	bench-stress bench-stress-quick bench-stress-raw bench-brainmask bench-groupwise bench-cohort calibrate-quality

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(call check_free_disk,$(VENV_GB),$(VENV))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,data,bench]"
	touch $@

install: $(VENV)/.installed

$(LABEL_VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(call check_free_disk,$(LABEL_VENV_GB),$(LABEL_VENV))
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --quiet --upgrade pip
	$(LABEL_PY) -m pip install --quiet -e ".[label]"
	touch $@

label-install: $(LABEL_VENV)/.installed

# Serve the MONAI Label app on 127.0.0.1:$(LABEL_PORT) over the NIfTI images in $(STUDIES).
label-serve: label-install
	PATH="$(abspath $(LABEL_VENV))/bin:$$PATH" monailabel start_server --app monailabel_app --studies $(STUDIES) \
		--host 127.0.0.1 --port $(LABEL_PORT)

# tests/test_monailabel.py starts the MONAI Label server from $(LABEL_VENV) (it fails if that venv is missing).
test: install label-install
	$(PY) -m ruff check custom_nets tests monailabel_app benchmarks
	KEYMORPH_LABEL_VENV="$(abspath $(LABEL_VENV))" $(PY) -m pytest -q tests

demo: install
	$(PY) -m custom_nets demo_data --out_dir demo_data
	cd bundle && ../$(PY) -m monai.bundle run inference --config_file configs/inference.json \
		--dataset_dir ../demo_data --output_dir ../demo_out
	$(PY) -m custom_nets score --results demo_out --datalist demo_data/datalist.json

# KeyMorph (+ refinement) against ANTs and elastix on the same held-out pairs: table.md, robustness.png in bench_out/.
bench: install
	$(PY) benchmarks/bench_registration.py main --mode full --out_dir bench_out

bench-quick: install
	$(PY) benchmarks/bench_registration.py main --mode quick --out_dir bench_out_quick

# The shipped weights on 100 held-out synthetic pairs (10 per angle bin x cross / same contrast), with and without
# refinement: the model card's weights table, in bench_weights/.
bench-weights: install
	$(PY) benchmarks/bench_registration.py main --mode weights --methods keymorph,keymorph_refine --out_dir bench_weights

# Peak resident memory of the bundle's inference on a 1 mm 256^3 pair, and over 50 consecutive pairs (prints figures).
bench-memory: install
	$(PY) benchmarks/bench_memory.py --pairs 50

# Pairs that look like real life (independent bias / noise / blur / gamma, T2 / PD / FLAIR-like and remapped
# contrasts, thick slices, cut fields of view, inter-subject, raw heads with brain-only twins): success, median, p95,
# gross failures and how the verdict sorts them, with ANTs on every 10th pair; bench_stress_out/table.md.
bench-stress: install
	$(PY) benchmarks/bench_stress.py main --mode full --out_dir bench_stress_out --methods keymorph_refine,keymorph,ants

bench-stress-quick: install
	$(PY) benchmarks/bench_stress.py main --mode quick --out_dir bench_stress_quick

# The full mode's 40 raw-head pairs and their brain-only twins alone (to measure a brain-extraction change).
bench-stress-raw: install
	$(PY) benchmarks/bench_stress.py main --mode raw --out_dir bench_stress_raw

# The quality verdict's measures on held-out pairs: the bundle's results and transforms of known error
# (calibration_out/samples.csv, summary.json); the thresholds in custom_nets/quality.py come from it.
calibrate-quality: install
	$(PY) benchmarks/calibrate_quality.py main --pairs 40 --out_dir calibration_out

# The brain extractor on 30 held-out synthetic heads (Dice by contrast, raw / brain-only / cut field of view, time).
bench-brainmask: install
	$(PY) benchmarks/bench_brainmask.py --num 30 --out_dir bench_brainmask_out

# Groupwise registration of 10 synthetic subjects in poses up to 180 degrees, against ANTs build_template
bench-groupwise: install
	$(PY) benchmarks/bench_groupwise.py main --num 10 --max_angle 180 --ants True --out_dir bench_groupwise_out

# Batch inference of a 200-pair synthetic cohort with 1 and 2 processes (torchrun), pairs per second and their ratio,
# peak memory per process at 50 and 200 pairs; on GPUs also 1 against all of them. Prints figures; summary.json.
bench-cohort: install
	$(PY) benchmarks/bench_cohort.py main --num 200 --memory_counts 50,200 --nproc 2 --batch_size 2 --work_dir bench_cohort_out

# Refresh bundle/large_files.yml (SHA-256 of bundle/models/model.pt) and pack dist/<bundle>_v<version>.zip.
release: install
	$(PY) -m custom_nets release --bundle_dir bundle --out_dir dist

clean:
	rm -rf $(VENV) $(LABEL_VENV) build *.egg-info .pytest_cache demo_data demo_out
