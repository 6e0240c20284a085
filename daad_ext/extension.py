"""Loading the compiled extension ``daad_ext._C``, which registers the fused C++ ops.

A checkout that was never built has no extension: the reference (and Triton) backends still work,
silently (``python -m daad_ext`` says what is missing). An extension that is there but cannot load
(built against another torch: undefined symbols; CUDA libraries missing: a failed ``dlopen``) must
not break ``import daad_ext`` either: one warning names the cause and the rebuild command, and the
backends that work remain.

A test run that must check the fused kernels cannot take that leniency: under CI (``CI=true``)
or with ``DAAD_REQUIRE_EXTENSION=1`` (:func:`required`), tests/conftest.py fails the run, before
collecting anything, with the reason :func:`shortfall` gives: the extension missing or not
loading, or built without its CUDA kernels where a CUDA toolkit would have built them.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import AbstractSet, Optional

import torch

from .toolkit import find_cuda_toolkit

MODULE = "daad_ext._C"
REBUILD = ("rebuild it against this torch: `pip install --no-build-isolation -e .` in the checkout "
           "(or `pip install --no-build-isolation --force-reinstall --no-deps .`)")

#: Set to 1, makes an incomplete build fail the test run, as CI (``CI=true``) does.
REQUIRE_ENV = "DAAD_REQUIRE_EXTENSION"

#: Why the extension did not load (None when it loaded, or was never built).
LOAD_ERROR: Optional[str] = None


class ExtensionWarning(UserWarning):
    """The compiled extension is present but cannot be loaded; the fused C++ ops are unavailable."""


def built_against() -> Optional[str]:
    """The torch version the extension was built against, where the build recorded it."""
    try:
        from ._build_info import BUILD
    except ImportError:
        return None
    return BUILD.get("torch")


def load_extension() -> Optional[ModuleType]:
    """Imports the extension; None if it did not load. Warns once (per process) if it failed to."""
    global LOAD_ERROR
    try:
        return importlib.import_module(MODULE)
    except ModuleNotFoundError as e:
        if e.name == MODULE:  # not built: a source checkout
            return None
        error: Exception = e
    except (ImportError, OSError) as e:
        error = e
    built = built_against()
    mismatch = (f"; it was built against torch {built}, this is torch {torch.__version__}"
                if built and built != torch.__version__ else "")
    LOAD_ERROR = f"{type(error).__name__}: {error}{mismatch}"
    warnings.warn(f"daad_ext: the compiled extension {MODULE} failed to load ({LOAD_ERROR}). The "
                  f"fused C++ kernels are unavailable; the reference and Triton backends still "
                  f"work. To fix, {REBUILD}.", ExtensionWarning, stacklevel=2)
    return None


def required() -> bool:
    """Whether a test run needs the complete build: under CI (``CI=true``, as CI services set it)
    or with ``DAAD_REQUIRE_EXTENSION=1``."""
    return os.environ.get("CI", "").lower() in ("true", "1") or os.environ.get(REQUIRE_ENV) == "1"


def cuda_toolkit() -> Optional[str]:
    """The CUDA toolkit setup.py builds the CUDA kernels with (:func:`~daad_ext.toolkit.find_cuda_toolkit`),
    unless ``DAAD_EXT_NO_CUDA=1`` turns the kernels off; else None."""
    if os.environ.get("DAAD_EXT_NO_CUDA", "0") == "1":
        return None
    return find_cuda_toolkit()[0]


def shortfall(kernel_devices: Optional[AbstractSet[str]]) -> Optional[str]:
    """Why this install falls short of the complete build, or None if it does not.

    ``kernel_devices`` is what the loaded extension has kernels for (daad_ext.ops.KERNEL_DEVICES),
    None when it did not load. Short: not built, built but not loading (:data:`LOAD_ERROR`), or
    built without the CUDA kernels where :func:`cuda_toolkit` finds a toolkit.
    """
    if kernel_devices is None:
        if LOAD_ERROR is not None:
            return f"the compiled extension {MODULE} failed to load ({LOAD_ERROR}); {REBUILD}"
        return (f"the compiled extension {MODULE} is not built: `pip install --no-build-isolation "
                f"-e .` (or `make setup`)")
    toolkit = cuda_toolkit()
    if toolkit is not None and "cuda" not in kernel_devices:
        return (f"the compiled extension {MODULE} was built without its CUDA kernels, but the "
                f"CUDA toolkit at {toolkit} would build them: rebuild with CUDA_HOME={toolkit}, "
                f"or set DAAD_EXT_NO_CUDA=1 to test without them")
    return None
