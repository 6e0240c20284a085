"""Launchers: check the arguments, allocate the outputs, pick the path and launch the kernels.

They take the raw ops' arguments plus a :class:`~daad_ext.triton.config.TritonConfig` (the ops
pass ``DEFAULT``; tests pass their own to force a path or a tiling). Sizes become plain ints (a
symbolic shape specialises): they pick tiles and paths. x, y and grad_x are addressed through
their own strides (NCHW, channels_last or any view); y and grad_x are allocated contiguous.

Saved for the backward: ``w`` (and ``p`` for MemAE), per row |q| and lse, per item |m| (the
outputs ``row_stats`` and ``item_norms``); never a B*Q*D copy.

Precision: float32 inputs use ``tl.dot`` in TF32 when PyTorch allows it and in full float32
otherwise; float16/bfloat16 use their tensor-core dots; accumulation and all statistics are
float32. Products involving ``A`` (float32) run in float32/TF32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from ..spec import SHRINK_CODES, Division
from . import checks, fused, items, tiled, tuning
from .config import DEFAULT, PART_ROWS, TritonConfig

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _strides(t: torch.Tensor, g: Division) -> tuple[int, ...]:
    """(sb, s_blk_c, s_blk_h, s_blk_w, sc, sh, sw): strides of a block's origin and inside it."""
    sb, sc, sh, sw = (int(st) for st in t.stride())
    return (sb, g.bc * sc, g.bh * sh, g.bw * sw, sc, sh, sw)


def _geo(g: Division) -> tuple[int, ...]:
    """(Q, RW, RHW, BW, BHW)."""
    return (g.num_queries, g.rw, g.rh * g.rw, g.bw, g.bh * g.bw)


def _item_norms(memory: torch.Tensor) -> torch.Tensor:
    n, d = int(memory.shape[0]), int(memory.shape[1])
    out = torch.empty(n, device=memory.device, dtype=torch.float32)
    wrap_triton(items.item_norms_kernel)[(tuning.cdiv(n, 64),)](
        memory, out, n, d, memory.stride(0), memory.stride(1), BLOCK_N=64, BLOCK_D=64)
    return out


def _tuned(kernel, family: tuning.Family, config: TritonConfig):
    return wrap_triton(tuning.autotuned(kernel, family, config))


def forward(x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int, similarity: str,
            shrink: str, threshold: float, temperature: float,
            config: TritonConfig = DEFAULT) -> Outputs:
    """(y, w, probs, row_stats, item_norms), as ``daad_ext::block_memory_forward_triton``."""
    g = checks.check_forward(x, memory, rh, rw, rc, similarity, shrink, threshold, temperature)
    b, n, d = int(x.shape[0]), int(memory.shape[0]), int(memory.shape[1])
    rows = b * g.num_queries
    memae, cosine, code = shrink == "memae", similarity == "cosine", SHRINK_CODES[shrink]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    w = torch.empty(b, g.num_queries, n, device=x.device, dtype=x.dtype)
    probs = torch.empty_like(w) if memae else x.new_empty(0)
    p_arg = probs if memae else w
    stats = torch.empty(b, g.num_queries, 2, device=x.device, dtype=torch.float32)
    norms = _item_norms(memory)
    # Half types: native tensor-core dots (the flag only concerns float32 operands).
    tf32 = tuning.allow_tf32(x.dtype) or x.dtype != torch.float32
    elt, n_pad = x.element_size(), max(16, tuning.next_pow2(n))
    lam, temperature = float(threshold), float(temperature)
    msd = (memory.stride(0), memory.stride(1))
    if tuning.use_fused(rows, n_pad, x.device, config):
        _tuned(fused.forward_kernel, tuning.FUSED, config)[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
            x, memory, norms, y, w, p_arg, stats, rows, n, d, *_geo(g), *_strides(x, g),
            *_strides(y, g), *msd, lam, temperature,
            COSINE=cosine, SHRINK=code, STORE_P=memae, TF32=tf32, N_PAD=n_pad, ELT=elt)
        return y, w, probs, stats, norms
    splits, split_d = tuning.split_d(rows, n, d, x.device, config)
    ws = torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
    sq = torch.empty(splits, rows, device=x.device, dtype=torch.float32)
    _tuned(tiled.products_kernel, tuning.PRODUCTS, config)[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(n, meta["BLOCK_N"]),
                      splits)](
        x, memory, ws, sq, rows, n, d, *_geo(g), split_d, *_strides(x, g), *msd,
        STORE_SQ=True, TF32=tf32, ELT=elt)
    block_r, block_n = tuning.row_tile(n)
    wrap_triton(tiled.rows_forward_kernel)[(tuning.cdiv(rows, block_r),)](
        ws, sq, norms, w, p_arg, stats, rows, n, splits, lam, temperature,
        COSINE=cosine, SHRINK=code, STORE_P=memae, BLOCK_R=block_r, BLOCK_N=block_n)
    _tuned(tiled.rows_times_memory_kernel, tuning.ROWS_TIMES_MEMORY, config)[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]))](
        w, memory, x, stats, y, rows, n, d, *_geo(g), *_strides(x, g), *_strides(y, g), *msd,
        CORRECT=False, F32_DOT=False, TF32=tf32, ELT=elt)
    return y, w, probs, stats, norms


def backward(grad_y: Optional[torch.Tensor], grad_w: Optional[torch.Tensor], x: torch.Tensor,
             memory: torch.Tensor, w: torch.Tensor, probs: torch.Tensor,
             row_stats: torch.Tensor, item_norms: torch.Tensor, rh: int, rw: int, rc: int,
             similarity: str, shrink: str, threshold: float, temperature: float,
             needs_grad_x: bool, needs_grad_memory: bool,
             config: TritonConfig = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_memory), as ``daad_ext::block_memory_backward_triton``: a gradient that is
    not needed is neither computed nor allocated, and comes back as an empty (0,) tensor."""
    g = checks.check_backward(grad_y, grad_w, x, memory, w, probs, row_stats, item_norms, rh, rw,
                              rc, similarity, shrink, threshold, temperature)
    b, n, d = int(x.shape[0]), int(memory.shape[0]), int(memory.shape[1])
    rows = b * g.num_queries
    memae, cosine, code = shrink == "memae", similarity == "cosine", SHRINK_CODES[shrink]
    has_gy, has_gw = grad_y is not None, grad_w is not None
    grad_x = (torch.empty(x.shape, device=x.device, dtype=x.dtype) if needs_grad_x
              else x.new_empty(0))
    grad_m = (torch.empty(n, d, device=x.device, dtype=memory.dtype) if needs_grad_memory
              else x.new_empty(0))
    if not (needs_grad_x or needs_grad_memory):
        return grad_x, grad_m
    gy = grad_y if has_gy else x  # a placeholder pointer when absent
    gx = grad_x if needs_grad_x else x  # (never written through)
    gw = grad_w.contiguous() if has_gw else w
    w = w.contiguous()
    p_arg = probs.contiguous() if memae else w
    stats = row_stats.contiguous()
    tf32 = tuning.allow_tf32(x.dtype) or x.dtype != torch.float32
    # Products with A (float32 operands): full float32 for float32 inputs unless TF32 is
    # allowed; TF32 for half inputs (whose own precision is lower still).
    a_tf32 = tf32
    elt, n_pad = x.element_size(), max(16, tuning.next_pow2(n))
    lam, temperature = float(threshold), float(temperature)
    msd = (memory.stride(0), memory.stride(1))
    flags = dict(HAS_GY=has_gy, HAS_GW=has_gw, COSINE=cosine, SHRINK=code,
                 NEED_GX=needs_grad_x, NEED_GM=needs_grad_memory)
    use_fused = tuning.use_fused(rows, n_pad, x.device, config)
    block_r, block_n = tuning.row_tile(n)
    num_parts = tuning.cdiv(rows, PART_ROWS if use_fused else block_r)

    def workspace(*shape: int, needed: bool = True) -> torch.Tensor:
        """A float32 buffer, or (where not needed) a placeholder pointer never dereferenced."""
        return torch.empty(shape, device=x.device, dtype=torch.float32) if needed else stats

    # dL/ds (A): the memory gradient reads it, and the tiled path's grad_x; the per-item partial
    # sums only the cosine memory gradient.
    a = workspace(rows, n, needed=needs_grad_memory or not use_fused)
    colpart = workspace(num_parts, n, needed=needs_grad_memory and cosine)
    if use_fused:
        _tuned(fused.backward_kernel, tuning.FUSED, config)[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
            gy, gw, x, memory, w, p_arg, stats, item_norms, a, colpart, gx,
            rows, n, d, *_geo(g), *_strides(gy, g), *_strides(x, g), *_strides(gx, g), *msd,
            lam, temperature, num_parts, **flags, TF32=tf32, A_TF32=a_tf32, N_PAD=n_pad,
            ELT=elt, F32_DOT=True, PART_ROWS=PART_ROWS)
    else:
        corr = workspace(rows, needed=needs_grad_x and cosine)
        splits, split_d = tuning.split_d(rows, n, d, x.device, config) if has_gy else (1, d)
        ws = workspace(splits, rows, n)
        if has_gy:
            _tuned(tiled.products_kernel, tuning.PRODUCTS, config)[
                lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),
                              triton.cdiv(n, meta["BLOCK_N"]), splits)](
                gy, memory, ws, corr, rows, n, d, *_geo(g), split_d, *_strides(gy, g), *msd,
                STORE_SQ=False, TF32=tf32, ELT=elt)
        wrap_triton(tiled.rows_backward_kernel)[(num_parts,)](
            ws, gw, w, p_arg, stats, item_norms, a, colpart, corr, rows, n, splits, lam,
            temperature, **flags, BLOCK_R=block_r, BLOCK_N=block_n)
        if needs_grad_x:
            _tuned(tiled.rows_times_memory_kernel, tuning.ROWS_TIMES_MEMORY, config)[
                lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),
                              triton.cdiv(d, meta["BLOCK_D"]))](
                a, memory, x, corr, grad_x, rows, n, d, *_geo(g), *_strides(x, g),
                *_strides(grad_x, g), *msd, CORRECT=cosine, F32_DOT=True, TF32=a_tf32, ELT=elt)
    if needs_grad_memory:
        _tuned(items.grad_memory_kernel, tuning.GRAD_MEMORY, config)[
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))](
            w, a, gy, x, memory, item_norms, colpart, grad_m, rows, n, d, *_geo(g), num_parts,
            *_strides(gy, g), *_strides(x, g), *msd, HAS_GY=has_gy, COSINE=cosine, TF32=tf32,
            A_TF32=a_tf32, ELT=elt)
    return grad_x, grad_m
