# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first
# (tools/setup_env.sh: .venv, torch, detectron2, the rest) and are idempotent.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-fast clean-demo

setup:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(VPY) tools/run_demo.py --output output/demo

test: setup
	$(VPY) -m pytest -q tests

test-fast: setup
	$(VPY) -m pytest -q -x tests -m "not slow"

clean-demo:
	rm -rf output/demo
