"""Building blocks of the kernels, inlined into them (as the fused-attention tutorial's
``_attn_fwd_inner``): block addressing, the element-wise pieces of csrc/block_memory.h, tile
loads and the loops over D, and the row epilogue (softmax, shrinkage) forward and backward.

Addressing: row ``r = b*Q + k`` of the (B*Q, D) query matrix is block ``k`` of image ``b``;
column ``d = (c*bh + y)*bw + x`` of a block is element (c, y, x) inside it. Indices are int32;
every offset is formed in int64 (a stride times an index can exceed 2**31 even when each is
small: a channel stride of 2**30, or an ordinary batch of more than 2**31 elements).

The kernels' parameters, which the launchers (:mod:`daad_ext.triton.launch`) pass by keyword:
``*_ptr`` tensors; sizes ``R`` (query rows B*Q), ``N`` (items), ``D`` (block length); the block
geometry ``Q`` (queries per image), ``RW``, ``RHW`` (rh*rw), ``BW``, ``BHW`` (bh*bw); the strides
of an NCHW operand ``t`` (``x`` input, ``y`` output, ``g`` grad_y, ``o`` grad_x or output):
``s{t}b`` per image, ``s{t}bc``/``s{t}bh``/``s{t}bw`` from one block to the next along C/H/W,
``s{t}c``/``s{t}h``/``s{t}w`` inside a block; the memory's ``smn`` (per item) and ``smd`` (per
column); ``threshold`` (the threshold) and ``temperature``; upper-case constexprs select variants
and tiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..spec import MEMAE_EPS, NORM_EPS, SHRINK_CODES

NORM_EPS_C = tl.constexpr(NORM_EPS)
MEMAE_EPS_C = tl.constexpr(MEMAE_EPS)
HARD = tl.constexpr(SHRINK_CODES["hard"])
MEMAE = tl.constexpr(SHRINK_CODES["memae"])
NO_SHRINK = tl.constexpr(SHRINK_CODES["none"])


# -------------------------------------------------------------------------------------------------
# Addressing of the blocks inside a (B, C, H, W) tensor of any strides.
# -------------------------------------------------------------------------------------------------
@triton.jit
def row_offsets(rows, Q, RW, RHW, sb, sbc, sbh, sbw):
    """Offset (int64) of the first element of block ``k`` of image ``b``, rows ``r = b*Q + k``."""
    k = rows % Q
    return ((rows // Q).to(tl.int64) * sb + (k // RHW).to(tl.int64) * sbc
            + ((k % RHW) // RW).to(tl.int64) * sbh + (k % RW).to(tl.int64) * sbw)


@triton.jit
def col_offsets(cols, BW, BHW, sc, sh, sw):
    """Offset (int64) of element d = (c*bh + y)*bw + x inside a block."""
    return ((cols // BHW).to(tl.int64) * sc + ((cols % BHW) // BW).to(tl.int64) * sh
            + (cols % BW).to(tl.int64) * sw)


# -------------------------------------------------------------------------------------------------
# Element-wise pieces of csrc/block_memory.h.
# -------------------------------------------------------------------------------------------------
@triton.jit
def clamp_norm(norm):
    return tl.where(norm >= NORM_EPS_C, norm, NORM_EPS_C)


@triton.jit
def grad_inv_norm(norm):
    """The backward's inverse norm: 1/|v| at or above the floor, 0 below (no direction there)."""
    ok = norm >= NORM_EPS_C
    return tl.where(ok, 1.0 / tl.where(ok, norm, 1.0), 0.0)


@triton.jit
def norm_correction(norm, dot):
    ok = norm >= NORM_EPS_C
    return tl.where(ok, dot / tl.where(ok, norm * norm, 1.0), 0.0)


@triton.jit
def zero_keeping_nan(v):
    """0 for a number, NaN for NaN (what the reference's 0/1 mask or relu gives): a NaN row
    stays NaN through the shrinkage."""
    return tl.where(v == v, 0.0, v)


@triton.jit
def memae_shrink(p, threshold):
    a = p - threshold
    return tl.where(a > 0.0, a * p / (a + MEMAE_EPS_C), zero_keeping_nan(a))


@triton.jit
def memae_shrink_grad(p, threshold):
    a = p - threshold
    e = MEMAE_EPS_C
    return tl.where(a > 0.0, (a * a + a * e + p * e) / ((a + e) * (a + e)), 0.0)


@triton.jit
def mma(a, b, acc, TF32: tl.constexpr):
    """acc + a @ b; float32 operands in TF32 or in full precision (a bool constexpr, not a
    string one, for torch.compile's sake). Half operands use their own tensor-core dots."""
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def cosine_scale(v, qn, mnorm_ptr, items, item_mask):
    """v / (|q| |m_i|) on a (rows x items) tile, both norms clamped: the forward's scaling."""
    mn = tl.load(mnorm_ptr + items, mask=item_mask, other=1.0)
    return v / (clamp_norm(qn)[:, None] * clamp_norm(mn)[None, :])


@triton.jit
def cosine_grad_scale(gs, qn, mnorm_ptr, items, item_mask):
    """A = dL/ds / (|q| |m_i|) on a (rows x items) tile, 0 where either norm is below the floor:
    no gradient flows through the similarity to a query or item without a direction."""
    mn = tl.load(mnorm_ptr + items, mask=item_mask, other=1.0)
    return gs * (grad_inv_norm(qn)[:, None] * grad_inv_norm(mn)[None, :])


@triton.jit
def store_stats(stats_ptr, rows, row_mask, qn, lse):
    """Row statistics (|q|, lse), two float32 per row."""
    off = rows.to(tl.int64) * 2
    tl.store(stats_ptr + off, qn, mask=row_mask)
    tl.store(stats_ptr + off + 1, lse, mask=row_mask)


@triton.jit
def load_stats(stats_ptr, rows, row_mask):
    """(|q|, lse) of the rows."""
    off = rows.to(tl.int64) * 2
    return (tl.load(stats_ptr + off, mask=row_mask, other=0.0),
            tl.load(stats_ptr + off + 1, mask=row_mask, other=0.0))


# -------------------------------------------------------------------------------------------------
# Tiles and the loops over D shared by the fused and tiled kernels.
# -------------------------------------------------------------------------------------------------
@triton.jit
def load_nchw(ptr, row_off, cols, mask, BW, BHW, sc, sh, sw):
    """The (rows x cols) tile of an NCHW operand, rows at block origins ``row_off``."""
    return tl.load(ptr + row_off[:, None] + col_offsets(cols, BW, BHW, sc, sh, sw)[None, :],
                   mask=mask, other=0.0)


@triton.jit
def store_nchw(ptr, row_off, cols, value, mask, BW, BHW, sc, sh, sw):
    """Stores a (rows x cols) tile into an NCHW tensor, in its dtype."""
    tl.store(ptr + row_off[:, None] + col_offsets(cols, BW, BHW, sc, sh, sw)[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_items(m_ptr, mrow, cols, item_mask, col_mask, smd):
    """The (items x cols) tile of M, items at (int64) offsets ``mrow``."""
    return tl.load(m_ptr + mrow[:, None] + cols.to(tl.int64)[None, :] * smd,
                   mask=item_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def query_item_dots(acc, qsq, x_ptr, xrow, row_mask, m_ptr, mrow, item_mask, d_start, d_end,
                    BW, BHW, sxc, sxh, sxw, smd,
                    ACC_SQ: tl.constexpr, TF32: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc + X[rows, d_start:d_end] @ M[items, d_start:d_end]^T, X's tiles read straight from
    NCHW; with ACC_SQ, qsq + the rows' squares summed over the same columns."""
    for d0 in range(d_start, d_end, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < d_end
        q = load_nchw(x_ptr, xrow, cols, row_mask[:, None] & col_mask[None, :],
                      BW, BHW, sxc, sxh, sxw)
        m = load_items(m_ptr, mrow, cols, item_mask, col_mask, smd)
        acc = mma(q, tl.trans(m), acc, TF32)
        if ACC_SQ:
            qf = q.to(tl.float32)
            qsq += tl.sum(qf * qf, axis=1)
    return acc, qsq


@triton.jit
def correct_and_store(acc, out_ptr, orow, x_ptr, xrow, corr, cols, mask,
                      BW, BHW, sxc, sxh, sxw, soc, soh, sow):
    """out[rows, cols] = acc - corr * q (acc where ``corr`` is None), q and out in NCHW."""
    if corr is not None:
        q = load_nchw(x_ptr, xrow, cols, mask, BW, BHW, sxc, sxh, sxw)
        acc -= corr[:, None] * q.to(tl.float32)
    store_nchw(out_ptr, orow, cols, acc, mask, BW, BHW, soc, soh, sow)


@triton.jit
def rows_times_items(a, m_ptr, mrow, item_mask, out_ptr, orow, x_ptr, xrow, corr, row_mask,
                     D, BW, BHW, sxc, sxh, sxw, soc, soh, sow, smd,
                     TF32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = a @ M - corr * q over all of D (no correction where ``corr`` is None), a (rows x all
    items) on chip; M's tiles in a's dtype."""
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        m = load_items(m_ptr, mrow, cols, item_mask, col_mask, smd)
        out = mma(a, m.to(a.dtype), tl.zeros((BLOCK_R, BLOCK_D), tl.float32), TF32)
        correct_and_store(out, out_ptr, orow, x_ptr, xrow, corr, cols,
                          row_mask[:, None] & col_mask[None, :],
                          BW, BHW, sxc, sxh, sxw, soc, soh, sow)


# -------------------------------------------------------------------------------------------------
# Row epilogue forward, mirroring row_forward() of csrc/block_memory.h. The fused kernels hold
# whole rows; the tiled ones sum the shrunk weights over item chunks, then normalise chunk by
# chunk: both call shrink() and normalise(), the one implementation of the shrinkage.
# -------------------------------------------------------------------------------------------------
@triton.jit
def shrink(p, pmax, item_mask, threshold, SHRINK: tl.constexpr):
    """The shrunk, not yet normalised weights of probabilities ``p`` (rows x items)."""
    if SHRINK == HARD:
        # Keep p_i >= threshold and the row maximum, so that no row is empty.
        keep = ((p >= threshold) | (p == pmax[:, None])) & item_mask[None, :]
        return tl.where(keep, p, zero_keeping_nan(p))
    elif SHRINK == MEMAE:
        return memae_shrink(p, threshold)
    else:
        return p


@triton.jit
def normalise(u, p, total, SHRINK: tl.constexpr):
    """The weights from the shrunk ``u`` and its row sums ``total`` (p itself without shrinkage)."""
    if SHRINK == HARD:
        return u / total[:, None]
    elif SHRINK == MEMAE:
        return u / tl.where(total >= MEMAE_EPS_C, total, MEMAE_EPS_C)[:, None]
    else:
        return p


@triton.jit
def shrunk_lse(lse_all, total, SHRINK: tl.constexpr):
    """The log-sum-exp that recovers s from w: the hard shrinkage renormalises by its kept mass."""
    if SHRINK == HARD:
        return lse_all + tl.log(total)
    else:
        return lse_all


@triton.jit
def row_forward(z, item_mask, threshold, SHRINK: tl.constexpr):
    """Logits -> (w, p, lse) of whole rows; padded items must hold -inf."""
    zmax = tl.max(z, axis=1)
    e = tl.exp(z - zmax[:, None])
    total_e = tl.sum(e, axis=1)
    p = e / total_e[:, None]
    u = shrink(p, tl.max(p, axis=1), item_mask, threshold, SHRINK)
    total = tl.sum(u, axis=1)
    return normalise(u, p, total, SHRINK), p, shrunk_lse(zmax + tl.log(total_e), total, SHRINK)


# -------------------------------------------------------------------------------------------------
# Row epilogue backward, mirroring row_backward(): dL/dw -> dL/ds.
# -------------------------------------------------------------------------------------------------
@triton.jit
def memae_grad_p(g, p, gw_dot, total, threshold):
    """MemAE's dL/dp from dL/dw, <dL/dw, w> and the shrunk total of each row."""
    safe_total = tl.where(total >= MEMAE_EPS_C, total, 1.0)
    gu = tl.where(total[:, None] >= MEMAE_EPS_C,
                  (g - gw_dot[:, None]) / safe_total[:, None], g / MEMAE_EPS_C)
    return gu * memae_shrink_grad(p, threshold)


@triton.jit
def similarity_grad(g, w, p, gw_dot, total, gp_dot, threshold, temperature, SHRINK: tl.constexpr):
    """(dL/ds, the weight it rests on: p for MemAE, w otherwise) of a (rows x items) tile."""
    if SHRINK == MEMAE:
        gs = p * (memae_grad_p(g, p, gw_dot, total, threshold) - gp_dot[:, None]) / temperature
        weight = p
    else:
        gs = w * (g - gw_dot[:, None]) / temperature
        weight = w
    return gs, weight


@triton.jit
def grad_times_similarity(gs, weight, lse, temperature):
    """dL/ds * s where the weight is > 0, else 0; s = T (log w + lse) (see block_memory.h)."""
    s = temperature * (tl.log(tl.where(weight > 0.0, weight, 1.0)) + lse[:, None])
    return tl.where(weight > 0.0, gs * s, 0.0)


@triton.jit
def row_backward(g, w, p, lse, threshold, temperature, SHRINK: tl.constexpr, NEED_PROD: tl.constexpr):
    """dL/dw -> (dL/ds, dL/ds * s where the weight is > 0) of whole rows."""
    gw_dot = tl.sum(g * w, axis=1)
    if SHRINK == MEMAE:
        total = tl.sum(memae_shrink(p, threshold), axis=1)
        gp_dot = tl.sum(memae_grad_p(g, p, gw_dot, total, threshold) * p, axis=1)
    else:
        total = gw_dot  # unused
        gp_dot = gw_dot  # unused
    gs, weight = similarity_grad(g, w, p, gw_dot, total, gp_dot, threshold, temperature, SHRINK)
    if NEED_PROD:
        prod = grad_times_similarity(gs, weight, lse, temperature)
    else:
        prod = gs
    return gs, prod
