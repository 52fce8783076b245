# Set-up is two commands: `make demo` and `make test`. Each creates .venv with
# pinned dependencies on first use, and the package installed in editable
# mode (its console commands, t5x-adapt-*, in .venv/bin). t5 is installed
# with --no-deps: its declared dependencies (seqio-nightly, tfds-nightly)
# would overwrite the files of seqio and tensorflow_datasets
# (tests/test_install.py checks; t5x_adapt/tasks/t5_lib.py).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# pytest is not one of the commands that put malloc on huge pages themselves
# (t5x_adapt/host_memory.py), so the suite gets the tunable here.
TEST_ENV := TF_CPP_MIN_LOG_LEVEL=3 GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: demo test test-all test-ci install clean

$(VENV)/.installed: requirements.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps t5==0.9.4
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-tpu.txt requirements-eval.txt requirements-gemma-lib.txt
	$(PIP) install -q -r requirements-test.txt -r requirements-tpu.txt -r requirements-eval.txt
	rm -rf $(VENV)/gemma_lib
	$(PIP) install -q --no-deps --target $(VENV)/gemma_lib -r requirements-gemma-lib.txt
	touch $@

install: $(VENV)/.installed

# No TF_CPP_MIN_LOG_LEVEL: the package quiets TensorFlow
# (t5x_adapt/__init__.py).
demo: $(VENV)/.installed
	$(PY) -m t5x_adapt.demo

# The suite CI runs: everything but the tests marked `slow` (README, "Tests"),
# then its ten slowest tests and set-ups (the paper experiment's quick grid is
# the set-up of tests/test_paper.py).
test: $(VENV)/.installed-test
	$(TEST_ENV) $(PY) -m pytest tests -q -rs -m "not slow" --durations=10 $(PYTEST_ARGS)

# Everything, the slow tests included (42 minutes on 2 CPU cores, 19 of
# them `make test`'s).
test-all: $(VENV)/.installed-test
	$(TEST_ENV) $(PY) -m pytest tests -q -rs $(PYTEST_ARGS)

# What CI runs (.ci/run): the whole suite plus the install would pass CI's
# 45-minute budget, so `make test` and then the slow tests behind the
# README's figures that fit (about 8 minutes): sharded loading, the real
# Gemma 3 270M's parity with transformers, one device against eight (the
# train step and the serving engine), the installed package. Not here:
# tests/test_adapt_270m.py, whose peak-RSS bound (1.5x the arrays' bytes;
# 0.94x alone) read 2.02x once after the tests before it in one process. A change that adds slow tests re-checks
# this split.
CI_SLOW_TESTS := tests/test_sharded_loading.py tests/test_gemma3_270m.py \
	tests/test_trainer.py tests/test_package.py tests/test_serving_engine.py
test-ci: test
	$(TEST_ENV) $(PY) -m pytest $(CI_SLOW_TESTS) -q -rs -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
