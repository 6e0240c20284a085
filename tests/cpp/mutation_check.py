"""Proof that the host execution layer catches kernel bugs (run by hand, not in CI; ~10 minutes).

Each mutation plants a typical CUDA bug in a temporary copy of csrc/, builds the emulated op
(tests/cuda_host_build.py) in the builds that should catch it, runs the host-layer tests there and
prints what reported it. Every mutation must be reported; the script exits non-zero otherwise.

    .venv/bin/python tests/cpp/mutation_check.py            # all mutations
    .venv/bin/python tests/cpp/mutation_check.py dropped-barrier lane-returns-early
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON, KERNELS = "csrc/cuda/common.cuh", "csrc/cuda/kernels.cuh"


class Mutation(NamedTuple):
    name: str
    path: str
    old: str        # must occur exactly once in the file
    new: str
    builds: tuple   # the builds expected to report it


MUTATIONS = [
    Mutation("dropped-barrier", COMMON,
             "      load_tiles<E>(smem, la, lb, m0, n0, k0, k_end);\n      __syncthreads();\n"
             "#pragma unroll\n      for (int kk",
             "      load_tiles<E>(smem, la, lb, m0, n0, k0, k_end);\n"
             "#pragma unroll\n      for (int kk", ("plain", "tsan")),
    Mutation("barrier-in-divergent-branch", COMMON,
             "    __syncthreads();  // the A/B tiles share these bytes\n    float* cs = c_tile(smem);\n"
             "    const int tr",
             "    if (threadIdx.x < 128) __syncthreads();  // the A/B tiles share these bytes\n"
             "    float* cs = c_tile(smem);\n    const int tr", ("plain",)),
    Mutation("warp-tile-offset", COMMON,
             "load_fragment(a[i], as + (wm * 32 + i * 16) * kLdAB + kk);",
             "load_fragment(a[i], as + (wm * 16 + i * 16) * kLdAB + kk);", ("plain",)),
    Mutation("missing-bounds-check", COMMON,
             "    if (r < rows && c < cols) f(r, c, cs[(e / BN) * kLdC + e % BN]);",
             "    f(r, c, cs[(e / BN) * kLdC + e % BN]);", ("asan",)),
    Mutation("wrong-leading-dimension", COMMON,
             "nvcuda::wmma::load_matrix_sync(f, tile, kLdAB);",
             "nvcuda::wmma::load_matrix_sync(f, tile, kLdAB + 2);", ("plain",)),
    Mutation("lane-returns-early", KERNELS,
             "  if (i >= items) return;\n  const E* m = memory",
             "  if (i >= items || lane >= dim) return;  // lanes without elements quit\n"
             "  const E* m = memory", ("plain",)),
]

#: Tests that reach both product paths and every kernel: fp32 on CUDA cores on a shape of several
#: tiles, fp16 on tensor cores, and small shapes (D = 16 < 32 lanes) in fp32 and fp16.
TESTS = ["tests/test_cuda.py", "-x", "-q", "-s", "-p", "no:cacheprovider", "-k",
         "cuda_host and (shapes-0 or tensor_core_shapes and float16 or matches_reference and "
         "(float32-cosine-hard-y+w or float16-cosine-hard-y+w))"]
#: What a report looks like, first match of each printed (sanitizer reports with their first frame).
EVIDENCE = [r"cuda_host: .*", r"WARNING: ThreadSanitizer: .*\n.*\n\s+#0 .*",
            r"ERROR: AddressSanitizer: .*\n.*\n\s+#0 .*", r"runtime error: .*",
            r"Mismatched elements: .*", r"FAILED .*"]


def _environment(build: str) -> dict:
    env = dict(os.environ, DAAD_CUDA_HOST=build, PYTHONDONTWRITEBYTECODE="1")
    cxx = os.environ.get("CXX", "c++")

    def runtime(name):
        return subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True,
                              text=True).stdout.strip()

    if build == "tsan":
        env.update(LD_PRELOAD=runtime("libtsan.so"), TSAN_OPTIONS="halt_on_error=1")
    elif build == "asan":
        env.update(LD_PRELOAD=f"{runtime('libasan.so')} {runtime('libstdc++.so')}",
                   ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    return env


def _copy_tree(dest: str) -> None:
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dest, "csrc"))
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dest, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pytest.ini"), dest)


def run_mutation(mutation: Mutation) -> bool:
    reported = False
    with tempfile.TemporaryDirectory(prefix="daad_mutation_") as tmp:
        _copy_tree(tmp)
        path = os.path.join(tmp, mutation.path)
        with open(path) as f:
            text = f.read()
        assert text.count(mutation.old) == 1, f"{mutation.name}: the pattern must occur once"
        with open(path, "w") as f:
            f.write(text.replace(mutation.old, mutation.new))
        for build in mutation.builds:
            start = time.time()
            proc = subprocess.run([sys.executable, "-m", "pytest", *TESTS], cwd=tmp,
                                  env=_environment(build), capture_output=True, text=True)
            output = proc.stdout + proc.stderr
            found = [" ".join(m.group(0).split()) for pattern in EVIDENCE for m in [re.search(pattern, output)] if m]
            caught = proc.returncode != 0 and bool(found)
            reported |= caught
            verdict = "REPORTED" if caught else "NOT REPORTED"
            print(f"  {build:5s} {verdict} (exit {proc.returncode}, {time.time() - start:.0f} s)")
            for line in found[:2]:
                print(f"        {line[:300]}")
    return reported


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    missed = []
    for mutation in chosen:
        print(f"{mutation.name}: {mutation.path}")
        if not run_mutation(mutation):
            missed.append(mutation.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations reported"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
