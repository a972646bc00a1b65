# The two README commands: `make demo` and `make test`. Both create .venv when
# it is missing and install the package (with its test extra) into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_data
# Three workers on a 2-core machine: XLA's CPU compiles are single-threaded
# and a test waiting on a subprocess, a file lock or the TF scorer leaves its
# core idle, so a third worker fills the gaps (the whole suite in 321 s
# against 364 s with 2 and 382 s with 4, on 2 quiet cores, warm venv, cold
# caches). Override with `make test PYTEST_WORKERS=0`.
PYTEST_WORKERS ?= 3
# Each test module on one worker (xdist's loadscope), so that a module's
# fixtures (the Keras models, a short training run, a storage emulator) are
# built once per run rather than once per worker: 328 s against 352-366 s for
# the whole suite on a 2-core machine. --no-loadscope-reorder keeps
# conftest.py's order (the slow modules first); xdist's own orders modules
# by their number of tests.
PYTEST_DIST := --dist loadscope --no-loadscope-reorder

.PHONY: install test test-fast demo lint clean-demo

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_DIST) tests

# The edit-test loop: the unit tests alone, every test marked neither `e2e`
# (a whole program or pipeline end to end: training, evaluation, a data set
# build, a program in a subprocess, the notebook, a benchmark script, or a
# fixture that trains) nor `multiprocess` (several JAX processes); the markers
# are registered in pyproject.toml. Session data fixtures the unit tests share
# (conftest.py's demo data set, the tiny GLDv2 and Revisited builds) are still
# built. `make test` (and .ci/run) runs everything.
test-fast: install
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_DIST) -m "not e2e and not multiprocess" tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: install
	$(PY) -m data_pipelines.make_demo_dataset --output_dir=$(DEMO_DIR)/raw --overwrite
	$(PY) -m data_pipelines.build_dataset --dataset=landmark_demo \
	  --manual_dir=$(DEMO_DIR)/raw --data_dir=$(DEMO_DIR)/tfds --num_shards=4 --overwrite
	rm -rf $(DEMO_DIR)/workdir $(DEMO_DIR)/export
	$(PY) -m landmark_jax.train --config=configs/demo.py --workdir=$(DEMO_DIR)/workdir
	$(PY) -m landmark_jax.training_summary --workdir=$(DEMO_DIR)/workdir
	$(PY) -m landmark_jax.evaluate --config=configs/demo.py --workdir=$(DEMO_DIR)/workdir
	$(PY) -m landmark_jax.export --workdir=$(DEMO_DIR)/workdir --output=$(DEMO_DIR)/export
	$(PY) experiments/serving/score_saved_model.py --saved_model=$(DEMO_DIR)/export \
	  --data=$(DEMO_DIR)/raw

clean-demo:
	rm -rf $(DEMO_DIR)
