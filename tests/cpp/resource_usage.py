"""What only the GPU compiler knows: registers, spills and shared memory of every kernel on sm_90.

CUDA (csrc/cuda): compiles block_memory_cuda.cu for sm_90 (device code only, with the flags of the
real build) with ``ptxas -v``, keeps the PTX for each kernel's ``__launch_bounds__`` (``.maxntid``,
``.minnctapersm``), prints one row per kernel and fails (exit 1) on

* any spill store or load;
* static shared memory over 48 KB (the most a kernel may declare statically);
* registers that leave room for fewer blocks per multiprocessor than the launch bounds promise
  (at least ``.minnctapersm`` blocks, default 1, of ``.maxntid`` threads in 64K registers).

Triton (``--triton``): runs the sm_90 compile test of tests/test_triton.py (its kernels and
configurations, compiled by Triton for sm_90 without a GPU) with ``triton.compile`` recorded, runs
``ptxas -v`` on each kernel's PTX and prints registers, spills and Triton's shared memory. Report
only: Triton picks registers and shared memory per configuration itself.

    python tests/cpp/resource_usage.py            # CUDA table; exit 1 on a violation
    python tests/cpp/resource_usage.py --triton   # and the Triton table
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SOURCE = os.path.join(ROOT, "csrc", "cuda", "block_memory_cuda.cu")
ARCH = "sm_90"
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256          # registers are allocated per warp in units of 256
STATIC_SMEM_LIMIT = 48 * 1024


class Usage(NamedTuple):
    kernel: str              # demangled, without namespaces and parameters
    registers: int
    spill_stores: int        # bytes
    spill_loads: int         # bytes
    smem: int                # bytes of static shared memory (Triton: its shared memory)
    max_threads: int = 0     # .maxntid (0: no launch bounds)
    min_blocks: int = 0      # .minnctapersm (0: none given)


def parse_ptxas(log: str) -> dict[str, dict]:
    """``ptxas -v`` output -> {mangled entry: registers, spill_stores, spill_loads, smem}."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = kernels.setdefault(entry.group(1), dict(registers=0, spill_stores=0,
                                                              spill_loads=0, smem=0))
            continue
        props = re.search(r"Function properties for (\S+)", line)
        if props:
            current = kernels.get(props.group(1))
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["spill_stores"], current["spill_loads"] = map(int, spills.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return kernels


def parse_launch_bounds(ptx: str) -> dict[str, tuple[int, int]]:
    """PTX -> {mangled entry: (.maxntid threads, .minnctapersm)}, for entries that declare them."""
    bounds = {}
    for chunk in ptx.split(".entry ")[1:]:
        name, header = chunk.split("(", 1)[0].strip(), chunk.split("{", 1)[0]
        ntid = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", header)
        ctas = re.search(r"\.minnctapersm\s+(\d+)", header)
        if ntid:
            x, y, z = map(int, ntid.groups())
            bounds[name] = (x * y * z, int(ctas.group(1)) if ctas else 0)
    return bounds


def short_name(mangled: str) -> str:
    """``_ZN8daad_ext4cuda9gm_kernelI6__halfLb1EEEv...`` -> ``gm_kernel<__half, true>``."""
    cxxfilt = shutil.which("c++filt")
    name = subprocess.run([cxxfilt, mangled], capture_output=True, text=True).stdout.strip() \
        if cxxfilt else mangled
    name = name.split("(", 1)[0].replace("daad_ext::cuda::", "")
    return re.sub(r"^void ", "", name)


def blocks_by_registers(usage: Usage) -> int:
    """Blocks of ``max_threads`` threads that the register file of one multiprocessor holds."""
    warps = -(-usage.max_threads // 32)
    per_warp = -(-usage.registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    return REGISTERS_PER_SM // (warps * per_warp) if per_warp else 0


def violations(usage: Usage) -> list[str]:
    found = []
    if usage.spill_stores or usage.spill_loads:
        found.append(f"spills ({usage.spill_stores} bytes stored, {usage.spill_loads} loaded)")
    if usage.smem > STATIC_SMEM_LIMIT:
        found.append(f"{usage.smem} bytes of static shared memory, more than 48 KB")
    if usage.max_threads and blocks_by_registers(usage) < max(1, usage.min_blocks):
        found.append(f"{usage.registers} registers hold {blocks_by_registers(usage)} blocks of "
                     f"{usage.max_threads} threads per SM, the launch bounds ask for "
                     f"{max(1, usage.min_blocks)}")
    return found


def table(rows: list[Usage], bounds: bool = True) -> str:
    header = ["kernel", "regs", "spill st", "spill ld", "smem"]
    if bounds:
        header += ["launch bounds", "blocks/SM (regs)"]
    lines = []
    for u in rows:
        line = [u.kernel, str(u.registers), str(u.spill_stores), str(u.spill_loads), str(u.smem)]
        if bounds:
            line += [f"{u.max_threads}, {u.min_blocks}" if u.max_threads else "-",
                     str(blocks_by_registers(u)) if u.max_threads else "-"]
        lines.append(line)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def cuda_usage() -> list[Usage]:
    """Compiles csrc/cuda for sm_90 with ptxas -v; one Usage per kernel."""
    import torch.utils.cpp_extension as ext

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [p for path in ext.include_paths() for p in ("-isystem", path)]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, f"-arch={ARCH}", "--cubin", "-o", os.path.join(tmp, "kernels.cubin"),
               "--resource-usage", "--keep", "--keep-dir", tmp, "-O3", "-std=c++20",
               *ext.COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=resource_usage", *includes,
               "-isystem", sysconfig.get_paths()["include"], CUDA_SOURCE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{proc.stdout}{proc.stderr}")
        ptx = "".join(open(os.path.join(tmp, f)).read() for f in os.listdir(tmp)
                      if f.endswith(".ptx"))
    bounds = parse_launch_bounds(ptx)
    return [Usage(short_name(name), **u, max_threads=bounds.get(name, (0, 0))[0],
                  min_blocks=bounds.get(name, (0, 0))[1])
            for name, u in sorted(parse_ptxas(proc.stdout + proc.stderr).items(),
                                  key=lambda item: short_name(item[0]))]


class TritonRecorder:
    """A pytest plugin that keeps every kernel ``triton.compile`` returns, with the parameters of
    the test that compiled it."""

    def __init__(self) -> None:
        self.compiled: list = []   # (test parameters, CompiledKernel)
        self.test = ""

    def pytest_configure(self, config) -> None:
        import triton

        compile_kernel = triton.compile

        def compile_and_record(*args, **kwargs):
            kernel = compile_kernel(*args, **kwargs)
            self.compiled.append((self.test, kernel))
            return kernel

        triton.compile = compile_and_record

    def pytest_runtest_call(self, item) -> None:
        self.test = item.name.partition("[")[2].rstrip("]")


def triton_usage() -> list[Usage]:
    """The kernels of the sm_90 compile test of tests/test_triton.py, through ptxas -v."""
    import pytest
    from triton.backends.nvidia.compiler import get_ptxas

    recorder = TritonRecorder()
    test = os.path.join(ROOT, "tests", "test_triton.py")
    code = pytest.main(["-q", "-p", "no:cacheprovider", test, "-k", "sm90"], plugins=[recorder])
    if code != 0 or not recorder.compiled:
        raise RuntimeError(f"the Triton sm_90 compile test compiled no kernel (exit {code})")
    ptxas = get_ptxas(90).path
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for test, kernel in recorder.compiled:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(kernel.asm["ptx"])
            # the options of Triton's own ptxas call (triton/backends/nvidia/compiler.py)
            proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", path,
                                   "-o", path + ".o"], capture_output=True, text=True, check=True)
            (u,) = parse_ptxas(proc.stdout + proc.stderr).values()
            name = f"{kernel.metadata.name} [{test}] ({kernel.metadata.num_warps} warps)"
            rows.append(Usage(name, u["registers"], u["spill_stores"], u["spill_loads"],
                              kernel.metadata.shared))
    return rows


def main(argv: list[str]) -> int:
    rows = cuda_usage()
    print(f"CUDA kernels (csrc/cuda) on {ARCH}: registers per thread, spill bytes, static shared "
          "memory bytes, __launch_bounds__ (threads, min blocks), blocks per SM the registers "
          "allow")
    print(table(rows))
    failed = [(u.kernel, v) for u in rows for v in violations(u)]
    for kernel, problem in failed:
        print(f"FAIL {kernel}: {problem}")
    if "--triton" in argv:
        print("\nTriton kernels of the sm_90 compile test (tests/test_triton.py): registers per "
              "thread, spill bytes, shared memory bytes (Triton's, dynamic)")
        print(table(triton_usage(), bounds=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
