#!/usr/bin/env bash
# The one-call GPU check (issue 4), for a GPU machine with torch, Triton and (for the CUDA
# kernels) a CUDA toolkit preinstalled, and no network:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT if set, else ./gpu_check_out
#
# 1. records the machine (nvidia-smi, torch, Triton, nvcc);
# 2. builds the extension in place with the machine's python (setup.py build_ext --inplace; no
#    pip, so nothing tries the network), CUDA kernels included when a toolkit is found;
# 3. runs the GPU tests: tests/test_cuda.py, tests/test_triton.py (fp32, fp16, bf16 against the
#    reference, opcheck, torch.compile(fullgraph=True) of BlockMemory), then tests/test_reference.py;
# 4. runs benchmarks/memory_op.py on the GPU in float32 and bfloat16 at the four DAAD scales, one
#    process per (scale, dtype), scale 1 first, so that a slow cell costs only its own table.
#
# Everything goes under OUT_DIR: one log per step (also shown on the terminal), JUnit XML of the
# tests, the benchmark tables as JSON, and summary.txt (one line per step). Every step runs under
# `timeout`, limited by its own cap and by what is left of the total budget (GPU_CHECK_BUDGET_S,
# default 345 s), so one hang cannot eat the rest and the whole check stays under 6 minutes; steps
# that find no time left are recorded as skipped. Exit status: the number of steps that failed,
# timed out or were skipped (0: everything ran and passed).
#
# Environment: PYTHON (default: python3 on PATH), CUDA_HOME (default: found from nvcc),
# TORCH_CUDA_ARCH_LIST (default 9.0, the H200), MAX_JOBS (default: all cores),
# GPU_CHECK_BUDGET_S, BENCH_REPEATS (default 15).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
OUT_DIR=${1:-${OUT:-$ROOT/gpu_check_out}}
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY=$OUT_DIR/summary.txt
: > "$SUMMARY"

PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-345}
BENCH_REPEATS=${BENCH_REPEATS:-15}
START_S=$SECONDS
FAILED=0
export PY PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START_S))s] $*" | tee -a "$SUMMARY"; }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND (a program or an exported shell function) under
# timeout (its cap, or what is left of the budget if less) in a child bash, output tee'd to
# OUT_DIR/NAME.log, and records the outcome in summary.txt. timeout kills the whole process group.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START_S)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    log "SKIP    $name (no time left in the ${BUDGET_S}s budget)"
    FAILED=$((FAILED + 1))
    return 0
  fi
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT_DIR/$name.log"
  timeout -k 10 "$limit" bash -c '"$@"' run_step "$@" 2>&1 | tee -a "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  if ((rc == 0)); then
    log "OK      $name ($((SECONDS - t0))s)"
  elif ((rc == 124 || rc == 137)); then
    log "TIMEOUT $name after ${limit}s (see $name.log)"
    FAILED=$((FAILED + 1))
  else
    log "FAIL    $name rc=$rc ($((SECONDS - t0))s, see $name.log)"
    FAILED=$((FAILED + 1))
  fi
  return 0
}

# --- 1. the machine ------------------------------------------------------------------------------
# The toolkit: $CUDA_HOME, else /usr/local/cuda, else where nvcc lives (`command -v nvcc` may be a
# wrapper script elsewhere, so a candidate must hold bin/nvcc and include/cuda_runtime.h).
find_cuda_home() {
  local candidate nvcc
  nvcc=$(command -v nvcc || true)
  for candidate in "${CUDA_HOME:-}" /usr/local/cuda \
      ${nvcc:+"$(dirname "$(dirname "$(readlink -f "$nvcc")")")"}; do
    if [[ -n $candidate && -x $candidate/bin/nvcc && -f $candidate/include/cuda_runtime.h ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if CUDA_HOME=$(find_cuda_home); then
  export CUDA_HOME
  export DAAD_REQUIRE_EXTENSION=1  # the run then fails if the extension or its CUDA kernels are missing
else
  unset CUDA_HOME
  log "WARNING no CUDA toolkit (nvcc) found: the CUDA kernels cannot be built; their tests skip"
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "OUT_DIR=$OUT_DIR PYTHON=$PY CUDA_HOME=${CUDA_HOME:-none} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST budget=${BUDGET_S}s"

# shellcheck disable=SC2329  # run through run_step (timeout bash -c)
machine_info() {
  nvidia-smi || echo "nvidia-smi failed"
  [[ -n ${CUDA_HOME:-} ]] && "$CUDA_HOME/bin/nvcc" --version
  "$PY" - << 'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
for name in ("pytest", "hypothesis", "numpy"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "MISSING: the steps that need it fail")
print("GPU available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))
    print("TF32 for matmuls allowed:", torch.backends.cuda.matmul.allow_tf32)
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}
export -f machine_info
run_step 01_machine 30 machine_info

# --- 2. build in place ---------------------------------------------------------------------------
# shellcheck disable=SC2329  # run through run_step (timeout bash -c)
build() {
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" - << 'EOF'
import torch
from daad_ext import available_backends, ops
kernels = [d for d in ("CPU", "CUDA") if ops.HAS_EXTENSION and
           torch._C._dispatch_has_kernel_for_dispatch_key(ops.FORWARD, d)]
print("extension built:", ops.HAS_EXTENSION, "| C++ kernels for:", kernels)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    print(f"backends for cuda {dtype}:", available_backends("cuda", dtype))
EOF
}
export -f build
run_step 02_build 170 build

# --- 3. tests ------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
run_step 03_test_cuda 80 "${PYTEST[@]}" --junitxml="$OUT_DIR/junit_test_cuda.xml" tests/test_cuda.py
# The registered Triton ops run with the environment's configuration: one autotuning configuration
# each (compile time); test_gpu_autotune benchmarks them all through its own TritonConfig.
run_step 04_test_triton 120 env DAAD_TRITON_AUTOTUNE=0 "${PYTEST[@]}" \
  --junitxml="$OUT_DIR/junit_test_triton.xml" tests/test_triton.py

# --- 4. benchmarks at the four DAAD scales, float32 and bfloat16 ------------------------------------
for scale in 1 2 3 4; do
  for dtype in float32 bfloat16; do
    run_step "05_bench_scale${scale}_${dtype}" 45 "$PY" benchmarks/memory_op.py --device cuda \
      --dtype "$dtype" --scales "$scale" --repeats "$BENCH_REPEATS" \
      --json "$OUT_DIR/bench_scale${scale}_${dtype}.json"
  done
done

# --- 5. the reference's own tests (CPU-heavy; last, with what is left) -----------------------------
run_step 06_test_reference 60 "${PYTEST[@]}" --junitxml="$OUT_DIR/junit_test_reference.xml" \
  tests/test_reference.py

log "done in $((SECONDS - START_S))s: $FAILED step(s) failed, timed out or skipped"
exit $((FAILED > 255 ? 255 : FAILED))
