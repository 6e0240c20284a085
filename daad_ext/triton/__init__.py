"""The ``"triton"`` backend: fused Triton kernels for the block-wise memory, forward and backward.

Layout (kernels at module level, in the manner of flash-attention's Triton modules):

* :mod:`.config` -- availability (``HAS_TRITON``, ``supports``), the frozen :class:`TritonConfig`
  and its ``DEFAULT`` from the environment, the indexing limits; no Triton import;
* :mod:`.tuning` -- autotuning configurations, the filter that prunes them, the path choice;
* :mod:`.jit` -- building blocks: block addressing (int64 offsets), the row epilogue;
* :mod:`.fused`, :mod:`.tiled`, :mod:`.items` -- the kernels of the two paths, and those over
  memory items both share;
* :mod:`.checks` -- the raw ops' argument checks; :mod:`.launch` -- the launchers;
* :mod:`.op` -- the ``torch.library.triton_op`` registrations.

Two paths, the same results (up to float summation order): **fused** (N padded to a power of two
<= 1024; one program per 16 or 32 query rows holds whole rows, the row epilogue on chip) and
**tiled** (any N; products split over row tiles x item tiles x D splits, the row epilogue over
item chunks with online softmax). ``path="auto"`` takes the fused path when its programs fill the
GPU, else the tiled one. The backward recovers the similarities as ``s_i = T (log w_i + lse)``
(csrc/block_memory.h) and computes only the gradients asked for.

Availability: CUDA tensors of float32/float16/bfloat16; CPU tensors of float32 only when
``TRITON_INTERPRET=1`` was set before this package was imported (Triton's interpreter, for tests).
Without Triton the package imports and the backend is simply unavailable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..spec import Division, schema_arguments
from .config import DEFAULT, HAS_TRITON, INTERPRETED, TritonConfig, supports

if HAS_TRITON:
    from . import op  # noqa: F401  (registers torch.ops.daad_ext.*_triton)

__all__ = ["DEFAULT", "HAS_TRITON", "INTERPRETED", "TritonConfig", "block_memory_triton",
           "call_triton", "supports"]


def _read(x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int, similarity: str,
          shrink: str, threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, w, *_ = torch.ops.daad_ext.block_memory_forward_triton(x, memory, rh, rw, rc, similarity,
                                                              shrink, threshold, temperature)
    return y, w


def block_memory_triton(x: torch.Tensor, memory: torch.Tensor, geometry: Division,
                        similarity: str, shrink: str, threshold: float,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton op on the layer's checked geometry and threshold; returns ``(y, w)``."""
    return _read(x, memory, geometry.rh, geometry.rw, geometry.rc, similarity, shrink, threshold,
                 temperature)


def call_triton(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int], similarity: str,
                shrink: str, threshold: Optional[float],
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton op on ``block_memory``'s own arguments; returns ``(y, w)``. The op checks the
    whole call (spec.check_call, and what the kernels take), so ``block_memory`` does not check
    it before: one check a call."""
    rh, rw, rc, threshold, temperature = schema_arguments(memory, division, threshold, temperature)
    return _read(x, memory, rh, rw, rc, similarity, shrink, threshold, temperature)
