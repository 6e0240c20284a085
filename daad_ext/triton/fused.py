"""The fused path (N padded to a power of two N_PAD <= MAX_FUSED_N): one program owns BLOCK_R
query rows and all N items, so the row epilogue runs on chip.

* forward, ONE kernel: loop over D accumulating the similarity tile (BLOCK_R x N_PAD, float32) and
  the query norms; cosine scaling, temperature, softmax, shrinkage and renormalisation on chip;
  store ``w`` (and ``p`` for MemAE) and the row statistics (|q|, lse); loop over D again writing
  ``w @ M`` straight into the NCHW ``y``.
* backward, row part: dL/dw = G @ M^T (+ grad_w), the epilogue backward on chip; then, for the
  memory gradient, A = dL/ds (scaled) and the per-item partial sums of dL/ds * s are stored
  (:mod:`daad_ext.triton.items` finishes gM), and for the input gradient
  ``grad_x = A @ M - (rowdot/|q|^2) q`` is written into NCHW. Each part only when asked for.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import jit
from .jit import MEMAE


@triton.jit
def forward_kernel(
        x_ptr, m_ptr, mnorm_ptr, y_ptr, w_ptr, p_ptr, stats_ptr,
        R, N, D, Q, RW, RHW, BW, BHW,
        sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw,
        syb, sybc, sybh, sybw, syc, syh, syw,
        smn, smd, threshold, temperature,
        COSINE: tl.constexpr, SHRINK: tl.constexpr, STORE_P: tl.constexpr,
        TF32: tl.constexpr, N_PAD: tl.constexpr, ELT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    items = tl.arange(0, N_PAD)
    item_mask = items < N
    xrow = jit.row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
    mrow = items.to(tl.int64) * smn
    s, qsq = jit.query_item_dots(tl.zeros((BLOCK_R, N_PAD), tl.float32),
                                 tl.zeros((BLOCK_R,), tl.float32), x_ptr, xrow, row_mask,
                                 m_ptr, mrow, item_mask, 0, D, BW, BHW, sxc, sxh, sxw, smd,
                                 True, TF32, BLOCK_D)
    qn = tl.sqrt(qsq)
    if COSINE:
        s = jit.cosine_scale(s, qn, mnorm_ptr, items, item_mask)
    z = tl.where(item_mask[None, :], s / temperature, float("-inf"))
    w, p, lse = jit.row_forward(z, item_mask, threshold, SHRINK)
    rn = rows.to(tl.int64)[:, None] * N + items[None, :]
    tile_mask = row_mask[:, None] & item_mask[None, :]
    tl.store(w_ptr + rn, w.to(w_ptr.dtype.element_ty), mask=tile_mask)
    if STORE_P:
        tl.store(p_ptr + rn, p.to(p_ptr.dtype.element_ty), mask=tile_mask)
    jit.store_stats(stats_ptr, rows, row_mask, qn, lse)
    # Second pass over D: y = w @ M, written straight into the NCHW output.
    yrow = jit.row_offsets(rows, Q, RW, RHW, syb, sybc, sybh, sybw)
    jit.rows_times_items(w.to(m_ptr.dtype.element_ty), m_ptr, mrow, item_mask, y_ptr, yrow,
                         x_ptr, xrow, None, row_mask, D, BW, BHW, sxc, sxh, sxw, syc, syh, syw,
                         smd, TF32, BLOCK_R, BLOCK_D)


@triton.jit
def backward_kernel(
        gy_ptr, gw_ptr, x_ptr, m_ptr, w_ptr, p_ptr, stats_ptr, mnorm_ptr,
        a_ptr, colpart_ptr, gx_ptr,
        R, N, D, Q, RW, RHW, BW, BHW,
        sgb, sgbc, sgbh, sgbw, sgc, sgh, sgw,
        sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw,
        sob, sobc, sobh, sobw, soc, soh, sow,
        smn, smd, threshold, temperature, NUM_PARTS,
        HAS_GY: tl.constexpr, HAS_GW: tl.constexpr, COSINE: tl.constexpr,
        SHRINK: tl.constexpr, NEED_GX: tl.constexpr, NEED_GM: tl.constexpr,
        TF32: tl.constexpr, N_PAD: tl.constexpr, ELT: tl.constexpr, PART_ROWS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    items = tl.arange(0, N_PAD)
    item_mask = items < N
    tile_mask = row_mask[:, None] & item_mask[None, :]
    mrow = items.to(tl.int64) * smn
    rn = rows.to(tl.int64)[:, None] * N + items[None, :]
    g = tl.zeros((BLOCK_R, N_PAD), tl.float32)
    if HAS_GY:
        grow = jit.row_offsets(rows, Q, RW, RHW, sgb, sgbc, sgbh, sgbw)
        g, _ = jit.query_item_dots(g, tl.zeros((BLOCK_R,), tl.float32), gy_ptr, grow, row_mask,
                                   m_ptr, mrow, item_mask, 0, D, BW, BHW, sgc, sgh, sgw, smd,
                                   False, TF32, BLOCK_D)
    if HAS_GW:
        g += tl.load(gw_ptr + rn, mask=tile_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rn, mask=tile_mask, other=0.0).to(tl.float32)
    if SHRINK == MEMAE:
        p = tl.load(p_ptr + rn, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        p = w
    qn, lse = jit.load_stats(stats_ptr, rows, row_mask)
    gs, prod = jit.row_backward(g, w, p, lse, threshold, temperature, SHRINK, COSINE)
    if COSINE:
        rowdot = tl.sum(prod, axis=1)
        if NEED_GM:
            # Per-item partial sums over each group of PART_ROWS rows: the same groups whatever
            # BLOCK_R the autotuner picks, so every partial row is written and the fixed-order
            # reduction of the memory gradient gives the same bits for every configuration.
            parts = tl.sum(tl.reshape(prod, (BLOCK_R // PART_ROWS, PART_ROWS, N_PAD)), axis=1)
            part_ids = pid * (BLOCK_R // PART_ROWS) + tl.arange(0, BLOCK_R // PART_ROWS)
            tl.store(colpart_ptr + part_ids.to(tl.int64)[:, None] * N + items[None, :], parts,
                     mask=(part_ids < NUM_PARTS)[:, None] & item_mask[None, :])
        a = jit.cosine_grad_scale(gs, qn, mnorm_ptr, items, item_mask)
        corr = jit.norm_correction(qn, rowdot)
    else:
        a = gs
        corr = None  # dot similarity: no norm correction
    if NEED_GM:
        tl.store(a_ptr + rn, a, mask=tile_mask)
    if NEED_GX:
        xrow = jit.row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
        orow = jit.row_offsets(rows, Q, RW, RHW, sob, sobc, sobh, sobw)
        jit.rows_times_items(a, m_ptr, mrow, item_mask, gx_ptr, orow, x_ptr, xrow, corr,
                             row_mask, D, BW, BHW, sxc, sxh, sxw, soc, soh, sow, smd,
                             TF32, BLOCK_R, BLOCK_D)
