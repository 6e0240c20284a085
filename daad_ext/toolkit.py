"""Finding the CUDA toolkit that builds the CUDA kernels: setup.py's search, and the rule of a
required test run (:mod:`daad_ext.extension`) use this one.

A toolkit is a folder with ``bin/nvcc``, ``include/cuda_runtime.h`` and ``lib64/`` (or ``lib/``)
``libcudart.so``. torch guesses ``CUDA_HOME`` from the ``nvcc`` on the PATH, which on some
machines is a wrapper script outside any toolkit (the link then stops on ``-lcudart``): the
search here checks each candidate instead. setup.py loads this file by its path before the
package is built, so it imports nothing of the package.

Example:
    >>> from daad_ext.toolkit import find_cuda_toolkit
    >>> home, tried = find_cuda_toolkit({"CUDA_HOME": "/nonexistent", "PATH": ""}, defaults=())
    >>> home, tried
    (None, ['/nonexistent (CUDA_HOME): no bin/nvcc'])
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Mapping, Optional, Sequence

#: Where toolkits are installed when no variable names one.
DEFAULT_HOMES = ("/usr/local/cuda",)


def missing_part(home: str) -> Optional[str]:
    """What ``home`` lacks to be a toolkit that builds the kernels, or None."""
    if not os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return "no bin/nvcc"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return "no include/cuda_runtime.h"
    if not any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib")):
        return "no lib64/libcudart.so"
    return None


def is_cuda_toolkit(home: Optional[str]) -> bool:
    """Whether ``home`` is a toolkit that builds the kernels (a bare ``nvcc`` wrapper is not)."""
    return bool(home) and missing_part(home) is None


def find_cuda_toolkit(env: Mapping[str, str] = os.environ,
                      defaults: Sequence[str] = DEFAULT_HOMES) -> tuple[Optional[str], list[str]]:
    """The first toolkit among ``CUDA_HOME``, ``CUDA_PATH``, the folder above the ``nvcc`` on the
    PATH (links followed) and ``defaults``; and each candidate passed over, with why."""
    candidates = [(env.get("CUDA_HOME"), "CUDA_HOME"), (env.get("CUDA_PATH"), "CUDA_PATH")]
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc:
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"nvcc on the PATH: {nvcc}"))
    candidates += [(home, "default") for home in defaults]
    tried = []
    for home, source in candidates:
        if not home:
            continue
        problem = missing_part(home)
        if problem is None:
            return home, tried
        tried.append(f"{home} ({source}): {problem}")
    return None, tried
