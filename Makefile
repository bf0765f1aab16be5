# One-command set-up and runs. `make test` and `make demo` work on a fresh machine:
# they create .venv, install the pinned dependencies and build the C++ extension.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
BUILD  := $(VENV)/.ext-built
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
NPROC  ?= 4
DEMO_CONFIG ?= examples/configs/tiny_limoe.yaml
PYTEST_ARGS ?=

.PHONY: setup lint test demo bench clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(VPY)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

$(BUILD): $(STAMP) setup.py $(CSRC)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(BUILD)

# ruff, then mypy over moe/ and parallel/ (moe/_C.pyi types the extension): both only need the
# pinned dependencies, not the C++ build; settings in pyproject.toml. .pre-commit-config.yaml runs the same.
lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m mypy

# pytest settings (testpaths, markers, timeout) are in pyproject.toml.
# A subset: make test PYTEST_ARGS='-m "not distributed"'
test: setup
	@if [ -f tools/nvcc_check.sh ]; then bash tools/nvcc_check.sh; fi
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q $(PYTEST_ARGS)

# every demo starts over: train.overwrite deletes the previous demo's checkpoints in its out_dir
demo: setup
	OMP_NUM_THREADS=1 $(VPY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) \
		-m moe.train --config $(DEMO_CONFIG) --set train.overwrite=true

bench: setup
	$(VPY) tools/bench_kernels.py --quick

clean:
	rm -rf build *.egg-info moe/_C*.so $(BUILD)
