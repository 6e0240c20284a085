"""Argument checks of the raw Triton ops, the same as the C++ ops' (csrc/op_checks.h) with
daad_ext/spec.py's messages, plus what the Triton kernels accept (device, dtype) and the limits of
their indexing (daad_ext/triton/config.py), all before anything is allocated or launched.

Limits: B*Q <= MAX_ROWS (2**31 - 256), N <= MAX_ITEMS (2**19), D <= MAX_BLOCK_DIM (2**19); every
element offset is int64, so C*H*W, B*Q*N and the strides of x, y and the memory have no limit of
their own (a channel stride of 2**30 elements is fine).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import spec
from .config import MAX_BLOCK_DIM, MAX_ITEMS, MAX_ROWS, SUPPORTED, supports


def _check_backend(x: torch.Tensor) -> None:
    if supports(x.device, x.dtype):
        return
    if x.device.type in ("cpu", "cuda") and supports(x.device, torch.float32):
        raise TypeError(f"the daad_ext Triton kernels support {SUPPORTED}, got dtype {x.dtype}")
    raise ValueError(f"the daad_ext Triton kernels support {SUPPORTED}, got a tensor on "
                     f"{x.device}")


def _check_kernels(x: torch.Tensor, memory: torch.Tensor, g: spec.Division) -> spec.Division:
    """What the kernels take beyond the spec: x's device and dtype, the limits of their indexing;
    returns the block geometry."""
    _check_backend(x)
    _check_limits(int(x.shape[0]), g, int(memory.shape[0]))
    return g


def _check_limits(batch: int, g: spec.Division, n: int) -> None:
    rows = batch * g.num_queries
    for name, value, limit in (("B*Q (query rows)", rows, MAX_ROWS), ("N (memory items)", n,
                               MAX_ITEMS), ("D (block length)", g.block_dim, MAX_BLOCK_DIM)):
        if value > limit:
            raise ValueError(f"the daad_ext Triton kernels take {name} <= {limit}, got {value}; "
                             "split the batch or use the cpu/cuda backend")


def check_forward(x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int,
                  similarity: str, shrink: str, threshold: float,
                  temperature: float) -> spec.Division:
    """Checks the forward op's arguments; returns the block geometry."""
    geometry, _ = spec.check_call(x, memory, (rh, rw, rc), similarity, shrink, threshold, temperature)
    return _check_kernels(x, memory, geometry)


def check_backward(grad_y: Optional[torch.Tensor], grad_w: Optional[torch.Tensor],
                   x: torch.Tensor, memory: torch.Tensor, w: torch.Tensor, probs: torch.Tensor,
                   row_stats: torch.Tensor, item_norms: torch.Tensor, rh: int, rw: int, rc: int,
                   similarity: str, shrink: str, threshold: float,
                   temperature: float) -> spec.Division:
    """Checks the backward op's arguments (spec.check_backward_call: those of the forward, the
    saved tensors and the gradients, every one on x's device); returns the block geometry."""
    geometry, _ = spec.check_backward_call(grad_y, grad_w, x, memory, w, probs, row_stats,
                                           item_norms, (rh, rw, rc), similarity, shrink,
                                           threshold, temperature)
    return _check_kernels(x, memory, geometry)
