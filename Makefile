# tf_dpfair: `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# The fast tests run in TEST_WORKERS processes (pytest-xdist): most of their
# time is single-threaded Python (tracing, model building, reports), so two
# processes on 2 cores took 11.5 min where one took 19 (987 tests).
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -m "not slow" -n $(TEST_WORKERS) --dist worksteal
EXTRAS := test,datasets,pretrained
# Exact versions (CPython 3.11, Linux x86_64) that the tests pass with; every
# install below is constrained to them. `make lock` refreshes the file.
LOCK := requirements/lock.txt
LOCK_VENV := .venv-lock
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test test-all benchmark build-file clean lock

# pip, setuptools and wheel come first, at their locked versions, so that
# building this package (and promise, which ships no wheel) uses them too
# (--no-build-isolation) instead of whatever is newest on PyPI that day.
$(STAMP): setup.cfg setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c $(LOCK) pip setuptools wheel
	$(PY) -m pip install $(PIP_FLAGS) -c $(LOCK) --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Re-resolves every dependency to the newest release that setup.cfg allows,
# in a fresh virtualenv, runs the fast tests there, and replaces the lock
# only if they pass. Review `git diff requirements/lock.txt` and commit it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install $(PIP_FLAGS) -e ".[$(EXTRAS)]"
	{ sed -n '/^#/!q;p' $(LOCK); \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	TF_DPFAIR_LOCK=$(LOCK).new $(LOCK_VENV)/bin/python -m pytest $(PYTEST_ARGS)
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK) re-resolved and tested; review: git diff $(LOCK)"

# Real Fashion-MNIST comes from Debian's dataset-fashion-mnist package; as
# root we install it, otherwise the demo says how and uses synthetic data.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "Could not install dataset-fashion-mnist; the demo will say what it uses."; \
	fi

# The demo runs as the installed console command (setup.cfg's entry points),
# as a user of the package would run it.
demo: $(STAMP) fashion-mnist
	$(VENV)/bin/tf-dpfair-demo

test: $(STAMP) fashion-mnist
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) fashion-mnist
	$(PY) -m pytest

benchmark: $(STAMP)
	$(PY) benchmarks/dp_overhead.py

build-file:
	$(PYTHON) tools/gen_build.py

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache
