"""Proof that the host execution layer reports typical kernel bugs (run by hand, not in CI).

Each mutation plants a bug in the CUDA sources. All of them are compiled once, into one copy of
csrc/ under build/cuda_host/mutants/, each behind a run-time switch (``DAAD_CUDA_HOST_MUTANT``
names the active one; none by default), and that copy is built once per sanitizer build
(tests/cuda_host_build.py with ``DAAD_CUDA_HOST_SOURCE``). Then the host-layer tests run once
unmutated in every build (they must pass) and once per mutation in each build that should report
it (JOBS=n test processes at a time, default 2); the script prints what reported each, how long
everything took, and exits non-zero if any mutation went unreported or the unmutated sources fail.

    .venv/bin/python tests/cpp/mutation_check.py                  # all mutations
    .venv/bin/python tests/cpp/mutation_check.py dropped-barrier missing-atomic
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import cuda_host_build  # noqa: E402

COMMON, KERNELS = "csrc/cuda/common.cuh", "csrc/cuda/kernels.cuh"
HOST = "csrc/cuda/block_memory_cuda.cu"
MUTANTS_DIR = os.path.join(ROOT, "build", "cuda_host", "mutants")


class Edit(NamedTuple):
    path: str
    anchor: str   # occurs exactly once in the file and contains ``old`` exactly once
    old: str
    new: str
    kind: str     # "expr": old and new are expressions; "stmt": statements


class Mutation(NamedTuple):
    name: str
    edits: tuple[Edit, ...]
    builds: tuple[str, ...]   # the builds expected to report it


def expr(path, anchor, old, new):
    return Edit(path, anchor, old, new, "expr")


def stmt(path, anchor, old, new):
    return Edit(path, anchor, old, new, "stmt")


MUTATIONS = [
    # Bugs between blocks and in shared memory, reported since the layer runs blocks together and
    # gives each block its own guarded shared memory.
    Mutation("missing-atomic", (  # coef_m summed by 4 blocks per item with += (atomicAdd needed)
        stmt(KERNELS, "  for (int r = 0; r < rows; ++r) s += prod[int64_t(r) * items + i];\n"
             "  coef_m[i] = norm_correction(item_norms[i], s);",
             "for (int r = 0; r < rows; ++r) s += prod[int64_t(r) * items + i];\n"
             "  coef_m[i] = norm_correction(item_norms[i], s);",
             "for (int r = blockIdx.y; r < rows; r += gridDim.y) s += prod[int64_t(r) * items + i];"
             " coef_m[i] += norm_correction(item_norms[i], s);"),
        expr(HOST, "launch(coldot_kernel, grid2(ceil_div(items, kThreads), 1)",
             "grid2(ceil_div(items, kThreads), 1)", "grid2(ceil_div(items, kThreads), 4)"),
        expr(HOST, "Tensor coef_m = cosine ? at::empty({g.N}, f32) : Tensor();",
             "at::empty({g.N}, f32)", "at::zeros({g.N}, f32)")), ("tsan",)),
    Mutation("shared-buffer-one-tile-short", (  # the C tile needs 16 rows more than this
        expr(COMMON, "  return ab > c ? ab : c;", "ab > c ? ab : c",
             "ab > c - 16 * kLdC * 4 ? ab : c - 16 * kLdC * 4"),), ("asan", "plain")),
    # Bugs the layer reported before.
    Mutation("butterfly-one-step-short", (
        expr(COMMON, "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync", "o > 0", "o > 1"),),
        ("plain",)),
    Mutation("grad-m-drops-last-row-block", (
        expr(KERNELS, "const int rows = a_t.inner.rows;", "a_t.inner.rows",
             "a_t.inner.rows / BK * BK"),), ("plain",)),
    Mutation("missing-barrier-between-grad-m-products", (  # first K step skips the barrier
        stmt(COMMON, "      __syncthreads();  // every thread is done with the previous tiles",
             "__syncthreads();", "if (k0 != k_begin) __syncthreads();"),), ("plain", "tsan")),
    Mutation("float16-stored-as-float-bits", (
        expr(COMMON, "__half from_float<__half>(float v) { return __float2half_rn(v); }",
             "__float2half_rn(v)", "*reinterpret_cast<const __half*>(&v)"),), ("plain",)),
    Mutation("dropped-barrier", (
        stmt(COMMON, "k_end);\n      __syncthreads();\n#pragma unroll\n      for (int kk",
             "__syncthreads();", ""),), ("plain", "tsan")),
    Mutation("barrier-in-divergent-branch", (
        stmt(COMMON, "    __syncthreads();  // the A/B tiles share these bytes\n"
             "    float* cs = c_tile(smem);\n    const int tr", "__syncthreads();",
             "if (threadIdx.x < 128) __syncthreads();"),), ("plain",)),
    Mutation("warp-tile-offset", (
        expr(COMMON, "load_fragment(a[i], as + (wm * 32 + i * 16) * kLdAB + kk);", "wm * 32",
             "wm * 16"),), ("plain",)),
    Mutation("missing-bounds-check", (
        expr(COMMON, "    if (r < rows && c < cols) f(r, c, cs[(e / BN) * kLdC + e % BN]);",
             "r < rows && c < cols", "true"),), ("asan",)),
    Mutation("wrong-leading-dimension", (
        expr(COMMON, "nvcuda::wmma::load_matrix_sync(f, tile, kLdAB);", "kLdAB", "kLdAB + 2"),),
        ("plain",)),
    Mutation("lane-returns-early", (
        expr(KERNELS, "  if (i >= items) return;\n  const E* m = memory", "i >= items",
             "i >= items || lane >= dim"),), ("plain",)),
]

#: Both product paths on shapes of several tiles: fp32 on CUDA cores (R = 96 and R = 72 rows, the
#: second ragged), fp16 on tensor cores, and a small shape (D = 16 < 32 lanes) in fp32 and fp16.
TESTS = [f"tests/test_cuda.py::{test}" for test in (
    "test_shapes[cuda_host-0]", "test_shapes[cuda_host-2]",
    "test_tensor_core_shapes[cuda_host-torch.float16]",
    "test_matches_reference[cuda_host-torch.float32-cosine-hard-y+w]",
    "test_matches_reference[cuda_host-torch.float16-cosine-hard-y+w]")]
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider", *TESTS]
#: What a report looks like, first match of each printed (sanitizer reports with their first frame).
EVIDENCE = [r"cuda_host: .*", r"WARNING: ThreadSanitizer: .*\n.*\n\s+#0 .*",
            r"ERROR: AddressSanitizer: .*\n(?:.*\n)*?\s+#0 .*", r"runtime error: .*",
            r"Mismatched elements: .*", r"FAILED .*"]
BUILDS = ("plain", "tsan", "asan")


def _switch(index: int, edit: Edit) -> str:
    on = f"::daad_mutant::on({index})"
    if edit.kind == "expr":
        return f"({on} ? ({edit.new}) : ({edit.old}))"
    return f"if ({on}) {{ {edit.new} }} else {{ {edit.old} }}"


def write_mutants(mutations: list[Mutation]) -> None:
    """The sources with every mutation behind its switch, under MUTANTS_DIR."""
    shutil.rmtree(os.path.join(MUTANTS_DIR, "csrc"), ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(MUTANTS_DIR, "csrc"))
    host = os.path.join(MUTANTS_DIR, cuda_host_build.HOST_SUBDIR)
    shutil.rmtree(host, ignore_errors=True)
    shutil.copytree(cuda_host_build.HOST_DIR, host)
    names = ", ".join(f'"{m.name}"' for m in mutations)
    with open(os.path.join(host, "mutant.h"), "w") as f:
        f.write(f"""// Written by tests/cpp/mutation_check.py: which planted bug is active.
#pragma once
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
namespace daad_mutant {{
inline bool on(int index) {{
  static const int active = [] {{
    const char* names[] = {{{names}}};
    const char* env = std::getenv("DAAD_CUDA_HOST_MUTANT");
    if (env == nullptr || *env == 0) return -1;
    for (int i = 0; i < int(sizeof names / sizeof names[0]); ++i)
      if (std::strcmp(env, names[i]) == 0) return i;
    throw std::runtime_error(std::string("unknown DAAD_CUDA_HOST_MUTANT ") + env);
  }}();
  return active == index;
}}
}}  // namespace daad_mutant
""")
    with open(os.path.join(host, "cuda_host.h"), "a") as f:
        f.write('\n#include "mutant.h"\n')
    for index, mutation in enumerate(mutations):
        for edit in mutation.edits:
            path = os.path.join(MUTANTS_DIR, edit.path)
            with open(path) as f:
                text = f.read()
            assert text.count(edit.anchor) == 1 and edit.anchor.count(edit.old) == 1, \
                f"{mutation.name}: {edit.path} must hold the anchor once, it the old text once"
            mutated = edit.anchor.replace(edit.old, _switch(index, edit))
            with open(path, "w") as f:
                f.write(text.replace(edit.anchor, mutated))


def _environment(build: str, mutant: str) -> dict:
    env = dict(os.environ, DAAD_CUDA_HOST=build, DAAD_CUDA_HOST_SOURCE=MUTANTS_DIR,
               DAAD_CUDA_HOST_MUTANT=mutant, PYTHONDONTWRITEBYTECODE="1")
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


class Run(NamedTuple):
    mutant: str   # "" for the unmutated sources
    build: str
    failed: bool
    evidence: list[str]
    seconds: float


def run_tests(mutant: str, build: str) -> Run:
    start = time.time()
    proc = subprocess.run(PYTEST, cwd=ROOT, env=_environment(build, mutant), capture_output=True,
                          text=True)
    output = proc.stdout + proc.stderr
    found = [" ".join(m.group(0).split()) for pattern in EVIDENCE
             for m in [re.search(pattern, output)] if m]
    if proc.returncode != 0 and not found:
        found = [output[-500:]]
    return Run(mutant, build, proc.returncode != 0, found, time.time() - start)


def build_all() -> None:
    for build in BUILDS:  # one process per build: each needs its sanitizer runtime preloaded
        start = time.time()
        code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
                f"import cuda_host_build; cuda_host_build.load({build!r})")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_environment(build, ""),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {build} build of the mutants failed:\n{proc.stderr[-3000:]}")
        print(f"built {build:5s} ({time.time() - start:.0f} s)", flush=True)


def main(names: list[str]) -> int:
    start = time.time()
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations: {', '.join(sorted(unknown))}")
    write_mutants(MUTATIONS)
    build_all()
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    jobs = [("", build) for build in BUILDS] + [(m.name, b) for m in chosen for b in m.builds]
    with ThreadPoolExecutor(max_workers=int(os.environ.get("JOBS", "2"))) as pool:
        runs = list(pool.map(lambda job: run_tests(*job), jobs))
    print(f"\n{'mutation':42s} {'build':5s} {'verdict':12s} {'time':>6s}  evidence")
    for run in runs:
        ok = run.failed == bool(run.mutant)
        verdict = ("REPORTED" if run.failed else "NOT REPORTED") if run.mutant else \
                  ("passes" if not run.failed else "FAILS")
        print(f"{run.mutant or '(none: the sources as they are)':42s} {run.build:5s} "
              f"{verdict:12s} {run.seconds:5.0f}s  {(run.evidence or [''])[0][:200]}"
              + ("" if ok else "   <-- expected the opposite"))
    missed = [m.name for m in chosen if not any(r.failed for r in runs if r.mutant == m.name)]
    clean = all(not r.failed for r in runs if not r.mutant)
    print(f"\n{len(chosen) - len(missed)} of {len(chosen)} mutations reported"
          + (f"; missed: {', '.join(missed)}" if missed else "")
          + ("" if clean else "; the unmutated sources FAIL")
          + f"; {time.time() - start:.0f} s in all")
    return 1 if missed or not clean else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
