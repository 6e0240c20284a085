# make bench: create .venv, install the pinned environment and daad_ext, run the benchmark.
# make test:  the same set-up where needed, then the test suite (what CI runs).
# make test-cuda-host: the CUDA kernels on the host execution layer (csrc/cuda/README.md) under
#              ThreadSanitizer and AddressSanitizer + UBSan (`make test` runs its plain build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.daad_ext_installed
# The CUDA kernels build where a toolkit is found (setup.py); point torch at it explicitly, since
# `which nvcc` may be a wrapper outside the toolkit. DAAD_EXT_NO_CUDA=1 skips them.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(wildcard /usr/local/cuda/bin/nvcc))
export CUDA_HOME
SOURCES := setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup bench test test-cuda-host clean

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

# The sanitizer builds run the host-layer tests that reach every kernel, tile and warp on both
# product paths (fp32 CUDA cores, TF32/fp16/bf16 tensor cores); any report fails the run (-s shows
# it). The runtimes must be preloaded into Python; ASan also needs libstdc++ loaded before it.
CXX ?= c++
CUDA_HOST_TESTS := -q -s -p no:cacheprovider tests/test_cuda.py \
	-k "cuda_host and (shapes or tensor_core or skipped or nan or empty or small_norms)"
test-cuda-host: setup
	DAAD_CUDA_HOST=tsan TSAN_OPTIONS=halt_on_error=1 \
	LD_PRELOAD="$$($(CXX) -print-file-name=libtsan.so)" $(PY) -m pytest $(CUDA_HOST_TESTS)
	DAAD_CUDA_HOST=asan ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	$(PY) -m pytest $(CUDA_HOST_TESTS)

clean:
	rm -rf build *.egg-info daad_ext/_C*.so $(VENV)
