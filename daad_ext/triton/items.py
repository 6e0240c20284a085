"""Kernels over the memory items, shared by both paths: the item norms |m_i| and the gradient of
the memory, ``gM = w^T G + A^T Q - diag(coldot/|m|^2) M``.

The memory gradient comes from one program per (item tile, D tile) that loops over all query rows
in a fixed order; the per-item ``coldot`` sums arrive as partial rows (one per group of PART_ROWS
query rows on the fused path, per row tile on the tiled one), also reduced in a fixed order. No
float atomics anywhere: two runs give the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import jit


@triton.jit
def item_norms_kernel(m_ptr, out_ptr, N, D, smn, smd, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    items = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    item_mask = items < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = jit.load_items(m_ptr, items.to(tl.int64) * smn, cols, item_mask, cols < D, smd)
        m = m.to(tl.float32)
        acc += tl.sum(m * m, axis=1)
    tl.store(out_ptr + items, tl.sqrt(acc), mask=item_mask)


@triton.jit
def grad_memory_kernel(
        w_ptr, a_ptr, gy_ptr, x_ptr, m_ptr, mnorm_ptr, colpart_ptr, gm_ptr,
        R, N, D, Q, RW, RHW, BW, BHW, NUM_PARTS,
        sgb, sgbc, sgbh, sgbw, sgc, sgh, sgw,
        sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw, smn, smd,
        HAS_GY: tl.constexpr, COSINE: tl.constexpr, TF32: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    items = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    item_mask = items < N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    gcol = jit.col_offsets(cols, BW, BHW, sgc, sgh, sgw)
    xcol = jit.col_offsets(cols, BW, BHW, sxc, sxh, sxw)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_mask = rows < R
        nr = rows.to(tl.int64)[None, :] * N + items[:, None]  # (BLOCK_N, BLOCK_K)
        nr_mask = item_mask[:, None] & row_mask[None, :]
        rd_mask = row_mask[:, None] & col_mask[None, :]
        if HAS_GY:
            wt = tl.load(w_ptr + nr, mask=nr_mask, other=0.0)
            grow = jit.row_offsets(rows, Q, RW, RHW, sgb, sgbc, sgbh, sgbw)
            g = tl.load(gy_ptr + grow[:, None] + gcol[None, :], mask=rd_mask, other=0.0)
            acc = jit.mma(wt.to(g.dtype), g, acc, TF32)
        at = tl.load(a_ptr + nr, mask=nr_mask, other=0.0)
        xrow = jit.row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
        q = tl.load(x_ptr + xrow[:, None] + xcol[None, :], mask=rd_mask, other=0.0)
        acc = jit.mma(at, q.to(tl.float32), acc, TF32)
    m = jit.load_items(m_ptr, items.to(tl.int64) * smn, cols, item_mask, col_mask, smd)
    if COSINE:
        coldot = tl.zeros((BLOCK_N,), tl.float32)
        part_ptr = colpart_ptr
        for _ in range(0, NUM_PARTS):
            coldot += tl.load(part_ptr + items, mask=item_mask, other=0.0)
            part_ptr += N
        mn = tl.load(mnorm_ptr + items, mask=item_mask, other=1.0)
        acc -= jit.norm_correction(mn, coldot)[:, None] * m.to(tl.float32)
    tl.store(gm_ptr + items.to(tl.int64)[:, None] * D + cols[None, :],
             acc.to(gm_ptr.dtype.element_ty), mask=item_mask[:, None] & col_mask[None, :])
