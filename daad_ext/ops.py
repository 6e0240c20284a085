"""Python side of the fused ops: fake tensors and autograd, registered side by side.

The C++ extension (``daad_ext._C``) defines ``daad_ext::block_memory_forward`` and
``daad_ext::block_memory_backward`` with CPU and, when built with CUDA, CUDA kernels. The Triton
ops in :mod:`daad_ext.triton` have the same signatures and use the same glue from here.

The fake kernels run the checks of :mod:`daad_ext.spec` (the C++ kernels' checks, with the same
messages), so ``torch.compile`` and ``torch.export`` reject bad input while tracing, as eager calls
do when they run. The backward computes only the gradients autograd asks for: a frozen memory
costs no grad_memory products, an input that needs no gradient no grad_x products.
"""
from __future__ import annotations

from typing import Callable

import torch

from .spec import Division, check_backward_call, check_call, compute_dtype
from .extension import load_extension

#: Importing the extension registers torch.ops.daad_ext.*; one that fails to load warns
#: (daad_ext/extension.py) and leaves the other backends.
_C = load_extension()
HAS_EXTENSION = _C is not None

FORWARD = "daad_ext::block_memory_forward"
BACKWARD = "daad_ext::block_memory_backward"
#: dtypes each device's C++ kernel accepts.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.float64, torch.bfloat16),
                    "cuda": (torch.float32, torch.float16, torch.bfloat16)}
#: Device types the extension was built with a kernel for (it says so itself); a constant, so that
#: torch.compile traces the backend choice as one.
KERNEL_DEVICES = frozenset(_C.KERNEL_DEVICES) if HAS_EXTENSION else frozenset()


def fake_forward(x, memory, rh, rw, rc, similarity, shrink, threshold, temperature):
    check_call(x, memory, (rh, rw, rc), similarity, shrink, threshold, temperature)
    b, q, n = x.shape[0], rh * rw * rc, memory.shape[0]
    stats = compute_dtype(x.dtype)
    probs = x.new_empty(b, q, n) if shrink == "memae" else x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(b, q, n), probs,
            x.new_empty(b, q, 2, dtype=stats), x.new_empty(n, dtype=stats))


def fake_backward(grad_y, grad_w, x, memory, w, probs, row_stats, item_norms, rh, rw, rc,
                  similarity, shrink, threshold, temperature, needs_grad_x, needs_grad_memory):
    check_backward_call(grad_y, grad_w, x, memory, w, probs, row_stats, item_norms, (rh, rw, rc),
                        similarity, shrink, threshold, temperature)
    grad_x = (torch.empty_like(x, memory_format=torch.contiguous_format) if needs_grad_x
              else x.new_empty(0))
    grad_memory = (torch.empty_like(memory, memory_format=torch.contiguous_format)
                   if needs_grad_memory else x.new_empty(0))
    return grad_x, grad_memory


def _setup_context(ctx, inputs, output) -> None:
    x, memory, *options = inputs
    _, w, probs, row_stats, item_norms = output
    ctx.save_for_backward(x, memory, w, probs, row_stats, item_norms)
    ctx.options = options
    ctx.mark_non_differentiable(probs, row_stats, item_norms)


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_y, grad_w, *_aux_grads):
        needs_grad_x, needs_grad_memory = ctx.needs_input_grad[:2]
        no_options = (None,) * len(ctx.options)
        if (grad_y is None and grad_w is None) or not (needs_grad_x or needs_grad_memory):
            return (None, None) + no_options
        grad_x, grad_memory = backward_op(grad_y, grad_w, *ctx.saved_tensors, *ctx.options,
                                          needs_grad_x, needs_grad_memory)
        # A gradient not asked for comes back as an empty (0,) tensor: autograd wants None.
        return ((grad_x if needs_grad_x else None, grad_memory if needs_grad_memory else None)
                + no_options)
    return backward


def register_fused_op(forward: str, backward: str, backward_op: Callable) -> None:
    """Registers fake kernels and autograd for a forward/backward op pair of this schema."""
    torch.library.register_fake(forward)(fake_forward)
    torch.library.register_fake(backward)(fake_backward)
    torch.library.register_autograd(forward, _make_backward(backward_op), setup_context=_setup_context)


if HAS_EXTENSION:
    register_fused_op(FORWARD, BACKWARD, torch.ops.daad_ext.block_memory_backward)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type in KERNEL_DEVICES and dtype in SUPPORTED_DTYPES.get(device.type, ())


def block_memory_fused(x: torch.Tensor, memory: torch.Tensor, geometry: Division, similarity: str,
                       shrink: str, threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ op (CPU or CUDA kernel, by device) on checked arguments; returns ``(y, w)``."""
    y, w, *_ = torch.ops.daad_ext.block_memory_forward(
        x, memory, geometry.rh, geometry.rw, geometry.rc, similarity, shrink, threshold, temperature)
    return y, w
