"""The block-wise memory operator in eager PyTorch: the specification every backend is tested against.

A feature map ``x`` (B, C, H, W) is divided into ``Q = rc*rh*rw`` blocks of ``D = bc*bh*bw``
values; query ``k = (ic*rh + ih)*rw + iw`` is the block
``x[b, ic*bc:(ic+1)*bc, ih*bh:(ih+1)*bh, iw*bw:(iw+1)*bw]`` flattened in (c, y, x) order. Each
query addresses the memory ``M`` (N, D):

* ``s_i = <q, m_i> / (max(|q|, eps) * max(|m_i|, eps))`` (cosine, eps = 1e-12) or ``<q, m_i>``
  (dot); in the cosine a vector below the floor carries no direction, so for the gradient
  ``<q, m_i>`` is a constant where ``|q|`` or ``|m_i|`` is below eps (the forward is unchanged):
  an all-zero block gets a zero gradient, an all-zero item only its gradient through ``y``;
* ``p = softmax(s / temperature)``;
* shrinkage with threshold ``threshold`` (default ``1/N``): ``hard`` keeps ``p_i >= threshold`` and the row
  maximum and re-normalises (the mask is a constant for the gradient); ``memae`` is MemAE's
  ``relu(p - threshold) * p / (|p - threshold| + eps)`` re-normalised; ``none`` keeps ``p``;
* block ``k`` of ``y`` is ``sum_i w_i M[i]``, re-assembled by the exact inverse of the division.

float16 and bfloat16 inputs are computed in float32 (as the kernels compute their statistics) and
the results rounded to the input dtype: in half precision the 1e-12 floors would round to 0 and
turn an all-zero block, a zero memory item or a MemAE row with nothing kept into NaN.

Example:
    >>> import torch
    >>> from daad_ext.reference import block_memory_ref
    >>> x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 4 * 4 * 4)
    >>> y, w = block_memory_ref(x, memory, (2, 2, 1))
    >>> y.shape, w.shape
    (torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 10]))
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .spec import MEMAE_EPS, NORM_EPS, Division, check_call, compute_dtype


def divide_blocks(x: torch.Tensor, geometry: Division) -> torch.Tensor:
    """(B, C, H, W) -> (B, Q, D): the queries, in the specification's order."""
    b = x.shape[0]
    rh, rw, rc, bc, bh, bw = geometry
    blocks = x.reshape(b, rc, bc, rh, bh, rw, bw).permute(0, 1, 3, 5, 2, 4, 6)
    return blocks.reshape(b, geometry.num_queries, geometry.block_dim)


def assemble_blocks(blocks: torch.Tensor, geometry: Division) -> torch.Tensor:
    """(B, Q, D) -> (B, C, H, W): the exact inverse of :func:`divide_blocks`."""
    b = blocks.shape[0]
    rh, rw, rc, bc, bh, bw = geometry
    x = blocks.reshape(b, rc, rh, rw, bc, bh, bw).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, rc * bc, rh * bh, rw * bw)


def similarity_ref(queries: torch.Tensor, memory: torch.Tensor, similarity: str) -> torch.Tensor:
    """(..., D) x (N, D) -> (..., N) similarities."""
    s = queries @ memory.t()
    if similarity == "cosine":
        q_norm = torch.linalg.vector_norm(queries, dim=-1, keepdim=True)
        m_norm = torch.linalg.vector_norm(memory, dim=-1)
        # Below the floor a vector carries no direction: <q, m_i> is a constant for the gradient
        # where either norm is (a where, not a mask product, so no inf * 0 = NaN can arise).
        s = torch.where((q_norm < NORM_EPS) | (m_norm < NORM_EPS), s.detach(), s)
        s = s / (q_norm.clamp_min(NORM_EPS) * m_norm.clamp_min(NORM_EPS))
    return s


def shrink_ref(p: torch.Tensor, shrink: str, threshold: float) -> torch.Tensor:
    """Shrinks and re-normalises the addressing weights ``p`` (rows over the last dimension)."""
    if shrink == "none":
        return p
    if shrink == "hard":
        with torch.no_grad():
            keep = (p >= threshold) | (p == p.amax(dim=-1, keepdim=True))
        kept = p * keep
        return kept / kept.sum(dim=-1, keepdim=True)
    u = F.relu(p - threshold) * p / ((p - threshold).abs() + MEMAE_EPS)
    return u / u.sum(dim=-1, keepdim=True).clamp_min(MEMAE_EPS)


def block_memory_ref(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int],
                     similarity: str = "cosine", shrink: str = "hard",
                     threshold: Optional[float] = None,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise memory read in eager PyTorch; returns ``(y, w)`` with ``w`` of shape (B, Q, N)."""
    geometry, threshold = check_call(x, memory, division, similarity, shrink, threshold, temperature)
    return block_memory_ref_checked(x, memory, geometry, similarity, shrink, threshold,
                                    float(temperature))


class Read(NamedTuple):
    """One read of the memory, in the precision it is computed in (:func:`~daad_ext.spec.compute_dtype`)."""

    queries: torch.Tensor  # (B, Q, D)
    memory: torch.Tensor  # (N, D)
    logits: torch.Tensor  # s / temperature, (B, Q, N)
    p: torch.Tensor  # softmax of the logits
    w: torch.Tensor  # the shrunk, re-normalised weights
    blocks: torch.Tensor  # w @ M, (B, Q, D): the output's blocks


def read_memory(x: torch.Tensor, memory: torch.Tensor, geometry: Division, similarity: str,
                shrink: str, threshold: float, temperature: float) -> Read:
    """The operator's steps on checked arguments, computed in ``compute_dtype(x.dtype)``: the one
    place where float16/bfloat16 inputs are cast up (the caller rounds what it returns)."""
    compute = compute_dtype(x.dtype)
    x, memory = x.to(compute), memory.to(compute)
    queries = divide_blocks(x, geometry)
    logits = similarity_ref(queries, memory, similarity) / temperature
    p = torch.softmax(logits, dim=-1)
    w = shrink_ref(p, shrink, threshold)
    return Read(queries, memory, logits, p, w, w @ memory)


def block_memory_ref_checked(x: torch.Tensor, memory: torch.Tensor, geometry: Division,
                             similarity: str, shrink: str, threshold: float,
                             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_memory_ref` on arguments that :mod:`daad_ext.spec` has already checked."""
    read = read_memory(x, memory, geometry, similarity, shrink, threshold, temperature)
    return assemble_blocks(read.blocks, geometry).to(x.dtype), read.w.to(x.dtype)
