"""Python side of the fused ops: fake tensors and autograd, registered side by side.

The C++ extension (``daad_ext._C``) defines ``daad_ext::block_memory_forward`` and
``daad_ext::block_memory_backward`` with CPU and, when built with CUDA, CUDA kernels. The Triton
ops in :mod:`daad_ext.triton_ops` have the same signatures and use the same glue from here.
"""
from __future__ import annotations

from typing import Callable

import torch

from .spec import Division

from .extension import load_extension

#: Importing the extension registers torch.ops.daad_ext.*; one that fails to load warns
#: (daad_ext/extension.py) and leaves the other backends.
HAS_EXTENSION = load_extension()

FORWARD = "daad_ext::block_memory_forward"
BACKWARD = "daad_ext::block_memory_backward"
#: dtypes each device's C++ kernel accepts.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.float64),
                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-row and per-item statistics are kept in float32 for half types."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_forward(x, memory, rh, rw, rc, similarity, shrink, threshold, temperature):
    b, q, n = x.shape[0], rh * rw * rc, memory.shape[0]
    stats = stats_dtype(x.dtype)
    probs = x.new_empty(b, q, n) if shrink == "memae" else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(b, q, n), probs,
            x.new_empty(b, q, 2, dtype=stats), x.new_empty(n, dtype=stats))


def fake_backward(grad_y, grad_w, x, memory, *saved_and_options):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(memory, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    x, memory, *options = inputs
    _, w, probs, row_stats, item_norms = output
    ctx.save_for_backward(x, memory, w, probs, row_stats, item_norms)
    ctx.options = options
    ctx.mark_non_differentiable(probs, row_stats, item_norms)


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_y, grad_w, *_aux_grads):
        if grad_y is None and grad_w is None:
            return (None,) * (2 + len(ctx.options))
        grad_x, grad_memory = backward_op(grad_y, grad_w, *ctx.saved_tensors, *ctx.options)
        return (grad_x, grad_memory) + (None,) * len(ctx.options)
    return backward


def register_fused_op(forward: str, backward: str, backward_op: Callable) -> None:
    """Registers fake kernels and autograd for a forward/backward op pair of this schema."""
    torch.library.register_fake(forward)(fake_forward)
    torch.library.register_fake(backward)(fake_backward)
    torch.library.register_autograd(forward, _make_backward(backward_op), setup_context=_setup_context)


if HAS_EXTENSION:
    register_fused_op(FORWARD, BACKWARD, torch.ops.daad_ext.block_memory_backward)


def _kernel_devices() -> frozenset[str]:
    if not HAS_EXTENSION:
        return frozenset()
    return frozenset(device for device in ("cpu", "cuda")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, device.upper()))


#: Device types the extension was built with a kernel for; read once, so that torch.compile
#: traces the backend choice as a constant.
KERNEL_DEVICES = _kernel_devices()


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type in KERNEL_DEVICES and dtype in SUPPORTED_DTYPES.get(device.type, ())


def block_memory_fused(x: torch.Tensor, memory: torch.Tensor, geometry: Division, similarity: str,
                       shrink: str, lam: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ op (CPU or CUDA kernel, by device) on checked arguments; returns ``(y, w)``."""
    y, w, *_ = torch.ops.daad_ext.block_memory_forward(
        x, memory, geometry.rh, geometry.rw, geometry.rc, similarity, shrink, lam, temperature)
    return y, w
