# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first
# (tools/setup_env.sh: .venv, torch, detectron2, the rest) and are idempotent.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-fast few-shot part-awareness clean-demo

setup:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(VPY) tools/run_demo.py --output output/demo

# After `make demo`: the few-shot table (1/10/100 % part labels, ours vs the instance teacher).
few-shot: demo
	$(VPY) tools/few_shot.py --ours output/demo/distill/round_0/model_final.pth \
		--teacher output/demo/instance_teacher/model_final.pth --output output/few_shot

# After `make demo`: probes before/after PARTICLE and the pipeline with PARTICLE-mined parts.
part-awareness: demo
	$(VPY) tools/part_awareness_lab.py --output output/part_awareness --demo-output output/demo

test: setup
	$(VPY) -m pytest -q tests

test-fast: setup
	$(VPY) -m pytest -q -x tests -m "not slow"

clean-demo:
	rm -rf output/demo
