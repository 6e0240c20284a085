"""What a bug report needs: versions, the extension's build, backends per device and dtype, CPU
features. ``python -m daad_ext`` prints :func:`report`.

Example:
    >>> from daad_ext.info import report
    >>> "backends" in report()
    True
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Optional

import torch

from . import __version__, extension, ops
from .autocast import run_dtype
from .functional import available_backends

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: /proc/cpuinfo flags that matter for the CPU kernels and bf16 autocast.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16")


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_flags() -> list[str]:
    """The flags of :data:`CPU_FLAGS` this CPU has (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


def extension_lines() -> list[str]:
    try:
        from ._build_info import BUILD
    except ImportError:
        BUILD = {}
    if ops.HAS_EXTENSION:
        status = f"loaded ({sys.modules['daad_ext._C'].__file__})"
    elif extension.LOAD_ERROR:
        status = f"FAILED TO LOAD: {extension.LOAD_ERROR}; {extension.REBUILD}"
    else:
        status = "not built (source checkout): `pip install --no-build-isolation -e .`"
    return [f"  status:           {status}",
            f"  kernels for:      {', '.join(sorted(ops.KERNEL_DEVICES)) or 'none'}",
            f"  built against:    torch {BUILD.get('torch', '?')}, CUDA {BUILD.get('cuda') or 'none'}",
            f"  CUDA archs built: {BUILD.get('cuda_archs') or 'none'}"]


def backend_lines() -> list[str]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = []
    for device in devices:
        for dtype in DTYPES:
            names = available_backends(device, dtype)
            lines.append(f"  {device:5s} {str(dtype).replace('torch.', ''):9s} auto -> {names[0]:10s}"
                         f"available: {', '.join(names)}")
        for cast in (torch.bfloat16, torch.float16):
            dtype = run_dtype("auto", cast, lambda d: available_backends(device, d))
            lines.append(f"  {device:5s} autocast to {str(cast).replace('torch.', '')}: auto runs "
                         f"{available_backends(device, dtype)[0]} in {str(dtype).replace('torch.', '')}")
    return lines


def report() -> str:
    cuda = (f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
            + ", ".join(f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                        for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available() else f"{torch.version.cuda or 'none'} (no GPU visible)")
    lines = [
        f"daad_ext {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__}, CUDA {cuda}",
        f"triton {package_version('triton') or 'not installed'}"
        + (" (TRITON_INTERPRET=1: interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        "extension:", *extension_lines(),
        "backends (per device and dtype; auto's choice first):", *backend_lines(),
        "cpu:",
        f"  {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        f"  torch CPU capability: {torch.backends.cpu.get_cpu_capability()}",
        f"  features: {' '.join(cpu_flags()) or 'unknown'}",
        f"  OpenMP {torch.backends.openmp.is_available()}, MKL {torch.backends.mkl.is_available()}, "
        f"oneDNN {torch.backends.mkldnn.is_available()}",
    ]
    return "\n".join(lines)
