# The two commands of the README: `make demo` and `make test`. Both build the venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint typecheck bench bench-dataloader-venv bench-dataloader clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch from the CPU wheel stored on this machine; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,torch,globus,plot]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m iosvc.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

test-slow: $(STAMP)
	$(PY) -m pytest -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check iosvc dataloaders tests bench
	$(VENV)/bin/ruff format --check iosvc dataloaders tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/throughput.py --json bench/results/throughput.json

# MosaicML streaming and LitData import torchvision, which does not load beside the torch 2.13.0
# CPU wheel: they run in their own venv (torch 2.14.1 + torchvision 0.29.1, ~6 GB).
bench-dataloader-venv: $(STAMP)
	$(PY) bench/dataloader.py --make-peer-venv

bench-dataloader: bench-dataloader-venv
	$(PY) bench/dataloader.py --json bench/results/dataloader.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
