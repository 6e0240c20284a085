"""Mixed precision: the dtype ``block_memory`` runs in under ``torch.autocast``.

Autocast runs a linear layer in its low-precision dtype (float16 or bfloat16) by casting the
input and the float32 weight. The block-wise memory does the same with ``x`` and its memory where
the chosen backend has a kernel for that dtype (the C++ CPU kernel runs bfloat16, not float16), and
runs in float32 where it has not, as autocast does for the ops on its float32 list. For
``backend="auto"`` a fused kernel in float32 is preferred over the reference in the autocast
dtype. The casts are ordinary ``Tensor.to`` calls: the gradient reaches a float32 parameter in
float32. The op itself then runs with autocast off, so that the reference's products stay in the
dtype chosen here. Outside autocast nothing is cast and mismatched dtypes raise as before.

Example:
    >>> import torch
    >>> from daad_ext import BlockMemory
    >>> layer = BlockMemory(8, 16, 16, num_items=50, division=(4, 4, 1))
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     y = layer(torch.nn.Conv2d(3, 8, 1)(torch.randn(2, 3, 16, 16)))
    >>> y.dtype  # the fused CPU kernel runs bfloat16
    torch.bfloat16
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

#: Device types with an autocast mode, and the dtypes autocast casts (float64 is left alone).
AUTOCAST_DEVICES = ("cpu", "cuda")
CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(x: torch.Tensor, memory: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype if autocast is on for ``x``'s device and both tensors are castable
    (anything else is left to the argument checks)."""
    if not (isinstance(x, torch.Tensor) and isinstance(memory, torch.Tensor)):
        return None
    device_type = x.device.type
    if (device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type)
            or x.dtype not in CASTABLE or memory.dtype not in CASTABLE):
        return None
    return torch.get_autocast_dtype(device_type)


def run_dtype(backend: str, cast: torch.dtype,
              available: Callable[[torch.dtype], list[str]]) -> torch.dtype:
    """The dtype the op runs in under autocast to ``cast``, for ``backend``.

    ``available(dtype)`` lists the backends that run ``dtype`` on the input's device, fastest first.
    """
    in_cast = available(cast)
    if backend != "auto":
        return cast if backend in in_cast else torch.float32
    in_float32 = available(torch.float32)
    if in_cast and (in_cast[0] != "reference" or in_float32[:1] == ["reference"]):
        return cast
    return torch.float32


def autocast_inputs(x: torch.Tensor, memory: torch.Tensor, backend: str,
                    available: Callable[[torch.device, torch.dtype], list[str]]
                    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, memory)`` cast to the dtype the op runs in under autocast, or None outside autocast.

    ``available(device, dtype)`` lists the backends that run ``dtype`` on ``device``, fastest first.
    The caller runs the op on the result with autocast off.
    """
    cast = autocast_dtype(x, memory)
    if cast is None:
        return None
    dtype = run_dtype(backend, cast, lambda d: available(x.device, d))
    return x.to(dtype), memory.to(dtype)
