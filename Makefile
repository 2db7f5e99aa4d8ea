# Two entry points for a fresh machine (see README.md):
#   make demo   -- set everything up, then run the main job (end-to-end demo)
#   make test   -- set everything up, then run the test suite
# Both are idempotent: a second run reuses .venv and the installed data.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.djpq-installed
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# aarch64 cross toolchain + qemu-user: tests/test_tvm_aarch64.py runs an aarch64 build under
# emulation (it skips, naming what is missing, without them).
AARCH64_PKGS := qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-arm64-cross
PYTEST_ARGS ?=

.PHONY: setup data arm-tools demo test lint clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned: these versions come from the local package cache.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[tvm,onnxruntime,vision,plots,data,test,lint]'
	touch $(STAMP)

data:
	@if [ ! -f $(DATA) ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or set DJPQ_DATA"; \
	  fi; \
	fi

# Best effort: without root or apt the aarch64 tests skip; the test run does not fail for it.
arm-tools:
	@if ! { command -v qemu-aarch64 && command -v aarch64-linux-gnu-g++; } >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(AARCH64_PKGS) (aarch64 tests under qemu)"; \
	    (apt-get install -y -q $(AARCH64_PKGS) >/dev/null 2>&1 \
	     || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(AARCH64_PKGS) >/dev/null 2>&1)) \
	    || echo "note: could not apt-get install $(AARCH64_PKGS); the aarch64 qemu tests will skip"; \
	  else \
	    echo "aarch64 tests will skip: run 'sudo apt-get install $(AARCH64_PKGS)' to check ARM"; \
	  fi; \
	fi

demo: setup
	$(PY) -m djpq_compiler.cli demo --model vgg7

test: setup arm-tools
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check djpq_compiler passes backends tests examples benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info
