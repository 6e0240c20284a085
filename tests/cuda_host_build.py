"""Test-only build of the CUDA op on the host execution layer (tests/cpp/cuda_host/).

``load(variant)`` compiles csrc/cuda/block_memory_cuda.cu with the host C++ compiler, with
tests/cpp/cuda_host/cuda_host.h force-included, and registers the op for CPU tensors as
``torch.ops.daad_ext_emu.block_memory_forward`` / ``_backward`` (the schemas of csrc/ops.cpp,
compiled alongside). It is never installed and never used by ``backend="auto"``. Variants:

* ``plain``: -O2;
* ``tsan``:  ThreadSanitizer (run Python with ``LD_PRELOAD=$(c++ -print-file-name=libtsan.so)``);
* ``asan``:  AddressSanitizer + UndefinedBehaviorSanitizer, any report fatal (run Python with
  ``LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``).

Builds are cached under build/cuda_host/<variant> (torch.utils.cpp_extension rebuilds when a
source or a flag changes), so a test run pays for each build once. ``make test-cuda-host`` runs
the emulated tests in all three. ``DAAD_CUDA_HOST_SOURCE`` builds another tree with the same
layout instead of this checkout (tests/cpp/mutation_check.py points it at its mutants).

In CI (``CI=true`` or ``DAAD_REQUIRE_EXTENSION=1``) the host-layer tests must run: a build that
cannot be made fails them with the reason instead of skipping them (``required()``).

    python tests/cuda_host_build.py tsan     # build only
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_SUBDIR = os.path.join("tests", "cpp", "cuda_host")
HOST_DIR = os.path.join(ROOT, HOST_SUBDIR)
NAMESPACE = "daad_ext_emu"
VARIANTS = {
    "plain": (["-O2"], []),
    "tsan": (["-O1", "-g", "-fsanitize=thread"], ["-fsanitize=thread"]),
    "asan": (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all"], ["-fsanitize=address,undefined"]),
}
#: The sanitizer runtime each variant needs preloaded into Python.
RUNTIMES = {"tsan": "libtsan.so", "asan": "libasan.so"}


def cuda_include_dir() -> str | None:
    """The toolkit's headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime_api.h), or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    include = os.path.join(home, "include")
    return include if os.path.exists(os.path.join(include, "cuda_fp16.h")) else None


def required() -> bool:
    """Whether the host-layer tests must run rather than skip (CI)."""
    return (os.environ.get("CI", "").lower() in ("true", "1")
            or os.environ.get("DAAD_REQUIRE_EXTENSION") == "1")


def source_root() -> str:
    """The tree whose csrc/ and tests/cpp/cuda_host/ are built: this checkout by default."""
    return os.path.abspath(os.environ.get("DAAD_CUDA_HOST_SOURCE", ROOT))


def variant_from_env() -> str:
    variant = os.environ.get("DAAD_CUDA_HOST", "plain")
    if variant not in VARIANTS:
        raise ValueError(f"DAAD_CUDA_HOST={variant!r}; choose one of {tuple(VARIANTS)}")
    return variant


def runtime_loaded(variant: str) -> bool:
    """Whether this process has the sanitizer runtime the variant needs (LD_PRELOAD)."""
    if variant not in RUNTIMES:
        return True
    with open("/proc/self/maps") as maps:
        return RUNTIMES[variant] in maps.read()


def load(variant: str = "plain", verbose: bool = False):
    """Builds (or reuses) the emulated op and registers it; returns torch.ops.daad_ext_emu."""
    import torch

    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("the CUDA toolkit's headers (cuda_fp16.h) were not found; set CUDA_HOME")
    if not runtime_loaded(variant):
        raise RuntimeError(f"the {variant} build needs LD_PRELOAD=$(c++ -print-file-name="
                           f"{RUNTIMES[variant]}) (see tests/cuda_host_build.py)")
    root = source_root()
    build_dir = os.path.join(root, "build", "cuda_host", variant)
    os.makedirs(build_dir, exist_ok=True)
    # The compiler must not run with the sanitizer runtime preloaded (this process keeps it).
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        _build_and_load(variant, root, include, build_dir, verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    return getattr(torch.ops, NAMESPACE)


def _build_and_load(variant: str, root: str, include: str, build_dir: str, verbose: bool) -> None:
    from torch.utils.cpp_extension import load as load_extension

    cflags, ldflags = VARIANTS[variant]
    host_dir = os.path.join(root, HOST_SUBDIR)
    load_extension(
        name=f"daad_ext_cuda_host_{variant}",
        sources=[os.path.join(root, "csrc", "ops.cpp"), os.path.join(host_dir, "op.cpp")],
        extra_cflags=["-std=c++20", f"-Ddaad_ext={NAMESPACE}", "-isystem", include,
                      "-include", os.path.join(host_dir, "cuda_host.h"), "-Wall", "-Wno-unknown-pragmas",
                      *cflags],
        extra_ldflags=ldflags,
        extra_include_paths=[host_dir],  # its c10/cuda/*.h stand in for c10's
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    load(sys.argv[1] if len(sys.argv) > 1 else "plain", verbose=True)
    print("ok")
