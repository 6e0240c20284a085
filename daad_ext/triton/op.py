"""The Triton ops, registered with the fake kernels and autograd of :mod:`daad_ext.ops`::

    daad_ext::block_memory_forward_triton(x, memory, rh, rw, rc, similarity, shrink, threshold,
                                          temperature) -> (y, w, probs, row_stats, item_norms)
    daad_ext::block_memory_backward_triton(grad_y?, grad_w?, x, memory, w, probs, row_stats,
                                           item_norms, rh, rw, rc, similarity, shrink, threshold,
                                           temperature, needs_grad_x, needs_grad_memory)
                                           -> (grad_x, grad_memory)

Same schemas as the C++ ops (csrc/ops.cpp), same argument checks. Both are
``torch.library.triton_op``s, so ``torch.compile`` sees the kernels. They run with the
environment's :data:`~daad_ext.triton.config.DEFAULT` configuration.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .. import ops
from . import launch
from .config import DEFAULT

FORWARD = "daad_ext::block_memory_forward_triton"
BACKWARD = "daad_ext::block_memory_backward_triton"


@triton_op(FORWARD, mutates_args=())
def block_memory_forward_triton(
        x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int, similarity: str,
        shrink: str, threshold: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch.forward(x, memory, rh, rw, rc, similarity, shrink, threshold, temperature,
                          DEFAULT)


@triton_op(BACKWARD, mutates_args=())
def block_memory_backward_triton(
        grad_y: Optional[torch.Tensor], grad_w: Optional[torch.Tensor], x: torch.Tensor,
        memory: torch.Tensor, w: torch.Tensor, probs: torch.Tensor, row_stats: torch.Tensor,
        item_norms: torch.Tensor, rh: int, rw: int, rc: int, similarity: str, shrink: str,
        threshold: float, temperature: float, needs_grad_x: bool,
        needs_grad_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return launch.backward(grad_y, grad_w, x, memory, w, probs, row_stats, item_norms, rh, rw,
                           rc, similarity, shrink, threshold, temperature, needs_grad_x,
                           needs_grad_memory, DEFAULT)


ops.register_fused_op(FORWARD, BACKWARD, torch.ops.daad_ext.block_memory_backward_triton)
