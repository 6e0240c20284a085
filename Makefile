# make bench: create .venv, install the pinned environment and daad_ext, run the benchmark.
# make test:  the same set-up where needed, then the test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.daad_ext_installed
# The CUDA kernels build where a toolkit is found (setup.py); point torch at it explicitly, since
# `which nvcc` may be a wrapper outside the toolkit. DAAD_EXT_NO_CUDA=1 skips them.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(wildcard /usr/local/cuda/bin/nvcc))
export CUDA_HOME
SOURCES := setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup bench test clean

setup: $(STAMP)

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

bench: setup
	$(PY) benchmarks/memory_op.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf build *.egg-info daad_ext/_C*.so $(VENV)
