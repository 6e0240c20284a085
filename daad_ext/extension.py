"""Loading the compiled extension ``daad_ext._C``, which registers the fused C++ ops.

A checkout that was never built has no extension: the reference (and Triton) backends still work,
silently (``python -m daad_ext`` says what is missing). An extension that is there but cannot load
(built against another torch: undefined symbols; CUDA libraries missing: a failed ``dlopen``) must
not break ``import daad_ext`` either: one warning names the cause and the rebuild command, and the
backends that work remain.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional

import torch

MODULE = "daad_ext._C"
REBUILD = ("rebuild it against this torch: `pip install --no-build-isolation -e .` in the checkout "
           "(or `pip install --no-build-isolation --force-reinstall --no-deps .`)")

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
