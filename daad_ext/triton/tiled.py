"""The tiled path (any N): the products are split over (row tiles x item tiles x D splits) into a
float32 workspace, the row epilogue runs over chunks of items with multi-pass (online softmax)
reductions, and a third kernel forms ``w @ M`` (or ``A @ M``) over (row tiles x D tiles), looping
over item chunks. The D splits keep every SM busy when there are few query rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import jit
from .jit import MEMAE, NO_SHRINK


@triton.jit
def products_kernel(
        x_ptr, m_ptr, ws_ptr, sq_ptr,
        R, N, D, Q, RW, RHW, BW, BHW, SPLIT_D,
        sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw, smn, smd,
        STORE_SQ: tl.constexpr, TF32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """1/3: ws[split, r, i] = the split's part of X[r] . M[i], X (x or grad_y) read from NCHW;
    with STORE_SQ the split's part of |X[r]|^2 into sq[split, r]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    items = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    item_mask = items < N
    split = tl.program_id(2)
    xrow = jit.row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
    d_start = split * SPLIT_D
    d_end = tl.minimum(d_start + SPLIT_D, D)
    acc, qsq = jit.query_item_dots(tl.zeros((BLOCK_R, BLOCK_N), tl.float32),
                                   tl.zeros((BLOCK_R,), tl.float32), x_ptr, xrow, row_mask,
                                   m_ptr, items.to(tl.int64) * smn, item_mask, d_start, d_end,
                                   BW, BHW, sxc, sxh, sxw, smd, STORE_SQ, TF32, BLOCK_D)
    r64 = rows.to(tl.int64)
    tl.store(ws_ptr + split.to(tl.int64) * R * N + r64[:, None] * N + items[None, :], acc,
             mask=row_mask[:, None] & item_mask[None, :])
    if STORE_SQ:
        if tl.program_id(1) == 0:
            tl.store(sq_ptr + split.to(tl.int64) * R + r64, qsq, mask=row_mask)


@triton.jit
def _item_chunk(n0, r64, row_mask, N, BLOCK_N: tl.constexpr):
    """(items, item_mask, tile mask, offsets r*N + i) of the item chunk at n0."""
    items = n0 + tl.arange(0, BLOCK_N)
    item_mask = items < N
    mask = row_mask[:, None] & item_mask[None, :]
    return items, item_mask, mask, r64[:, None] * N + items[None, :]


@triton.jit
def _reduced_chunk(ws_ptr, rn, mask, R, N, SPLITS):
    """Sum of the D splits' partial products (splits R*N apart), in split order."""
    acc = tl.load(ws_ptr + rn, mask=mask, other=0.0)
    split_stride = tl.cast(R, tl.int64) * N
    part_ptr = ws_ptr
    for _ in range(1, SPLITS):
        part_ptr += split_stride
        acc += tl.load(part_ptr + rn, mask=mask, other=0.0)
    return acc


@triton.jit
def rows_forward_kernel(
        ws_ptr, sq_ptr, mnorm_ptr, w_ptr, p_ptr, stats_ptr,
        R, N, SPLITS, threshold, temperature,
        COSINE: tl.constexpr, SHRINK: tl.constexpr, STORE_P: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """2/3, forward: the row epilogue over item chunks (online softmax, then the shrinkage)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    r64 = rows.to(tl.int64)
    qsq = tl.load(sq_ptr + r64, mask=row_mask, other=0.0)
    part_ptr = sq_ptr
    for _ in range(1, SPLITS):
        part_ptr += R
        qsq += tl.load(part_ptr + r64, mask=row_mask, other=0.0)
    qn = tl.sqrt(qsq)
    # Pass 1: logits (kept in split 0 of the workspace), running max and sum of exponentials.
    zmax = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    total_e = tl.zeros((BLOCK_R,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
        s = _reduced_chunk(ws_ptr, rn, mask, R, N, SPLITS)
        if COSINE:
            s = jit.cosine_scale(s, qn, mnorm_ptr, items, item_mask)
        z = tl.where(item_mask[None, :], s / temperature, float("-inf"))
        tl.store(ws_ptr + rn, z, mask=mask)
        new_max = tl.maximum(zmax, tl.max(z, axis=1))
        total_e = total_e * tl.exp(zmax - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        zmax = new_max
    pmax = 1.0 / total_e  # p of the row maximum, exp(0) / sum
    # Pass 2: the row sums of the shrunk weights (the kept mass, or MemAE's total).
    total = tl.zeros((BLOCK_R,), tl.float32)
    if SHRINK != NO_SHRINK:
        for n0 in range(0, N, BLOCK_N):
            items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
            z = tl.load(ws_ptr + rn, mask=mask, other=float("-inf"))
            p = tl.exp(z - zmax[:, None]) / total_e[:, None]
            total += tl.sum(jit.shrink(p, pmax, item_mask, threshold, SHRINK), axis=1)
    # Pass 3: the weights.
    for n0 in range(0, N, BLOCK_N):
        items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
        z = tl.load(ws_ptr + rn, mask=mask, other=float("-inf"))
        p = tl.exp(z - zmax[:, None]) / total_e[:, None]
        w = jit.normalise(jit.shrink(p, pmax, item_mask, threshold, SHRINK), p, total, SHRINK)
        tl.store(w_ptr + rn, w.to(w_ptr.dtype.element_ty), mask=mask)
        if STORE_P:
            tl.store(p_ptr + rn, p.to(p_ptr.dtype.element_ty), mask=mask)
    jit.store_stats(stats_ptr, rows, row_mask, qn,
                    jit.shrunk_lse(zmax + tl.log(total_e), total, SHRINK))


@triton.jit
def rows_backward_kernel(
        ws_ptr, gw_ptr, w_ptr, p_ptr, stats_ptr, mnorm_ptr, a_ptr, colpart_ptr, corr_ptr,
        R, N, SPLITS, threshold, temperature,
        HAS_GY: tl.constexpr, HAS_GW: tl.constexpr, COSINE: tl.constexpr,
        SHRINK: tl.constexpr, NEED_GX: tl.constexpr, NEED_GM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """2/3, backward: dL/dw -> A = dL/ds (scaled for cosine); for the input gradient the row
    correction rowdot/|q|^2, for the memory gradient the per-item partial sums of dL/ds * s."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    r64 = rows.to(tl.int64)
    qn, lse = jit.load_stats(stats_ptr, rows, row_mask)
    # Pass 1: dL/dw (kept in split 0 of the workspace), <g, w> and MemAE's total.
    gw_dot = tl.zeros((BLOCK_R,), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
        if HAS_GY:
            g = _reduced_chunk(ws_ptr, rn, mask, R, N, SPLITS)
        else:
            g = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        if HAS_GW:
            g += tl.load(gw_ptr + rn, mask=mask, other=0.0).to(tl.float32)
        tl.store(ws_ptr + rn, g, mask=mask)
        w = tl.load(w_ptr + rn, mask=mask, other=0.0).to(tl.float32)
        gw_dot += tl.sum(g * w, axis=1)
        if SHRINK == MEMAE:
            p = tl.load(p_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(jit.memae_shrink(p, threshold), axis=1)
    # Pass 2 (MemAE): <dL/dp, p>.
    gp_dot = tl.zeros((BLOCK_R,), tl.float32)
    if SHRINK == MEMAE:
        for n0 in range(0, N, BLOCK_N):
            items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
            g = tl.load(ws_ptr + rn, mask=mask, other=0.0)
            p = tl.load(p_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            gp_dot += tl.sum(jit.memae_grad_p(g, p, gw_dot, total, threshold) * p, axis=1)
    # Pass 3: dL/ds, A, rowdot and the per-item partial sums of dL/ds * s.
    rowdot = tl.zeros((BLOCK_R,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
        g = tl.load(ws_ptr + rn, mask=mask, other=0.0)
        w = tl.load(w_ptr + rn, mask=mask, other=0.0).to(tl.float32)
        if SHRINK == MEMAE:
            p = tl.load(p_ptr + rn, mask=mask, other=0.0).to(tl.float32)
        else:
            p = w
        gs, weight = jit.similarity_grad(g, w, p, gw_dot, total, gp_dot, threshold, temperature, SHRINK)
        if COSINE:
            prod = jit.grad_times_similarity(gs, weight, lse, temperature)
            rowdot += tl.sum(prod, axis=1)
            if NEED_GM:
                tl.store(colpart_ptr + pid.to(tl.int64) * N + items, tl.sum(prod, axis=0),
                         mask=item_mask)
            a = jit.cosine_grad_scale(gs, qn, mnorm_ptr, items, item_mask)
        else:
            a = gs
        tl.store(a_ptr + rn, a, mask=mask)
    if COSINE and NEED_GX:
        tl.store(corr_ptr + rows, jit.norm_correction(qn, rowdot), mask=row_mask)


@triton.jit
def rows_times_memory_kernel(
        a_ptr, m_ptr, x_ptr, corr_ptr, out_ptr,
        R, N, D, Q, RW, RHW, BW, BHW,
        sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw,
        sob, sobc, sobh, sobw, soc, soh, sow, smn, smd,
        CORRECT: tl.constexpr, F32_DOT: tl.constexpr, TF32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr):
    """3/3: out = A @ M (- corr * q), A (R x N) row-major, out written into NCHW. Forward:
    A = w, no correction. Backward: A = dL/ds (scaled), corr = rowdot/|q|^2 (cosine)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    r64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_K):
        items = n0 + tl.arange(0, BLOCK_K)
        item_mask = items < N
        a = tl.load(a_ptr + r64[:, None] * N + items[None, :],
                    mask=row_mask[:, None] & item_mask[None, :], other=0.0)
        m = jit.load_items(m_ptr, items.to(tl.int64) * smn, cols, item_mask, col_mask, smd)
        if F32_DOT:
            acc = jit.mma(a.to(tl.float32), m.to(tl.float32), acc, TF32)
        else:
            acc = jit.mma(a.to(m.dtype), m, acc, TF32)
    if CORRECT:
        corr = tl.load(corr_ptr + rows, mask=row_mask, other=0.0)
    else:
        corr = None  # the forward (w @ M) and the dot similarity's backward: no correction
    xrow = jit.row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
    orow = jit.row_offsets(rows, Q, RW, RHW, sob, sobc, sobh, sobw)
    jit.correct_and_store(acc, out_ptr, orow, x_ptr, xrow, corr, cols,
                          row_mask[:, None] & col_mask[None, :],
                          BW, BHW, sxc, sxh, sxw, soc, soh, sow)
