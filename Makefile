# The two README commands: `make demo` and `make test`. Both create .venv when
# it is missing and install the package (with its test extra) into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
# Use both cores of a small machine; override with `make test PYTEST_WORKERS=0`.
PYTEST_WORKERS ?= 2

.PHONY: install test demo lint clean-demo

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: install
	$(PY) -m data_pipelines.make_demo_dataset --output_dir=$(DEMO_DIR)/raw --overwrite
	for split in train index test nonlandmark; do \
	  $(PY) -m data_pipelines.gldv2_to_tfrecord --split=$$split \
	    --csv=$(DEMO_DIR)/raw/$$split.csv \
	    $$( [ $$split = train ] && echo --clean_csv=$(DEMO_DIR)/raw/train_clean.csv --val_fraction=0.1 ) \
	    --images_dir=$(DEMO_DIR)/raw/$$split --output_dir=$(DEMO_DIR)/tfrecords \
	    --num_shards=4 || exit 1; \
	done
	$(PY) -m data_pipelines.describe_dataset --data_dir=$(DEMO_DIR)/tfrecords
	rm -rf $(DEMO_DIR)/workdir
	$(PY) -m landmark_jax.train --config=configs/demo.py --workdir=$(DEMO_DIR)/workdir
	$(PY) -m landmark_jax.training_summary --workdir=$(DEMO_DIR)/workdir
	$(PY) -m landmark_jax.evaluate --config=configs/demo.py --workdir=$(DEMO_DIR)/workdir

clean-demo:
	rm -rf $(DEMO_DIR)
