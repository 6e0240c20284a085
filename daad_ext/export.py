"""Export: the fused ops written as standard operators, for ``torch.export`` and ONNX.

Eager PyTorch and ``torch.compile`` call the fused kernels. An exported program records the op
itself (``daad_ext::block_memory_forward``), which a runtime without daad_ext (ONNX Runtime,
OpenVINO, AOTInductor elsewhere) cannot run; :func:`decompose` replaces it by its specification,
the reference (:mod:`daad_ext.reference`), in standard ATen operators.

Example:
    >>> import torch
    >>> from daad_ext import BlockMemory
    >>> from daad_ext.export import decompose
    >>> layer = BlockMemory(8, 16, 16, num_items=50, division=(4, 4, 1)).eval()
    >>> program = decompose(torch.export.export(layer, (torch.randn(2, 8, 16, 16),)))
    >>> any("daad_ext" in str(node.target) for node in program.graph.nodes)
    False
"""
from __future__ import annotations

from typing import Callable

import torch

from . import ops
from .reference import assemble_blocks, read_memory
from .spec import NORM_EPS, make_division

#: Fused forward ops (C++, Triton) that share the schema of ``daad_ext::block_memory_forward``.
FORWARD_OPS = ("block_memory_forward", "block_memory_forward_triton")


def forward_decomposition(x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int,
                          similarity: str, shrink: str, threshold: float, temperature: float):
    """The forward op's five outputs from standard operators: ``(y, w, probs, row_stats,
    item_norms)`` as the kernels define them (``row_stats`` = (|q|, lse) per query with
    ``s_i / T = log w_i + lse`` (log p_i for MemAE), ``item_norms`` = |m_i|, ``probs`` = p for
    MemAE's shrinkage, else empty). The reference's own steps (:func:`~daad_ext.reference.read_memory`,
    float16/bfloat16 computed in float32) give all of them; only ``y`` and ``w`` reach an exported
    inference graph."""
    _, c, h, w_ = x.shape
    geometry = make_division(c, h, w_, (rh, rw, rc))
    read = read_memory(x, memory, geometry, similarity, shrink, threshold, temperature)
    lse = torch.logsumexp(read.logits, dim=-1)
    if shrink == "hard":  # log(w_i) + lse = z_i for the kept items (csrc/block_memory.h)
        lse = lse + torch.log((read.p * (read.w > 0)).sum(dim=-1))
    q_norms = torch.linalg.vector_norm(read.queries, dim=-1).clamp_min(NORM_EPS)
    item_norms = torch.linalg.vector_norm(read.memory, dim=-1).clamp_min(NORM_EPS)
    probs = read.p.to(x.dtype) if shrink == "memae" else x.new_empty(0)
    return (assemble_blocks(read.blocks, geometry).to(x.dtype), read.w.to(x.dtype), probs,
            torch.stack([q_norms, lse], dim=-1), item_norms)


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decomposition of every fused forward op registered in this process."""
    table = {}
    for name in FORWARD_OPS:
        if hasattr(torch.ops.daad_ext, name):
            table[getattr(torch.ops.daad_ext, name).default] = forward_decomposition
    return table


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with the fused ops replaced by standard operators (and PyTorch's default
    decompositions applied, as ``run_decompositions()`` does)."""
    table = torch.export.default_decompositions()
    table.update(decompositions())
    return program.run_decompositions(table)
