"""The ``"triton"`` backend: fused Triton kernels for the block-wise memory, forward and backward.

Ops (same schemas as the C++ ops of csrc/ops.cpp, same fake and autograd glue from
:mod:`daad_ext.ops`)::

    daad_ext::block_memory_forward_triton(x, memory, rh, rw, rc, similarity, shrink, threshold,
                                          temperature) -> (y, w, probs, row_stats, item_norms)
    daad_ext::block_memory_backward_triton(grad_y?, grad_w?, x, memory, w, probs, row_stats,
                                           item_norms, rh, rw, rc, similarity, shrink, threshold,
                                           temperature) -> (grad_x, grad_memory)

Both are ``torch.library.triton_op``s, so ``torch.compile`` sees the kernels. The queries are read
straight from the (B, C, H, W) input by address arithmetic on its strides (NCHW, channels_last or
any other layout; no permuted copy), and ``y`` / ``grad_x`` are written straight into NCHW.
Row ``r = b*Q + k`` of the (B*Q, D) query matrix is block ``k`` of image ``b``; column
``d = (c*bh + y)*bw + x`` of a block is element (c, y, x) inside it.

Two paths, the same results (up to float summation order):

* **fused** (N padded to a power of two ``N_PAD <= MAX_FUSED_N = 1024``): the forward is ONE kernel.
  Each program owns ``BLOCK_R`` queries; it loops over D in ``BLOCK_D`` chunks accumulating the
  similarity tile (BLOCK_R x N_PAD, float32) and the query norms, then on chip applies the cosine
  scaling, temperature, softmax, shrinkage and re-normalisation (the row epilogue of
  csrc/block_memory.h, mirrored line for line in ``_row_forward``), stores ``w`` (and ``p`` for
  MemAE) and the row statistics (|q|, lse), and loops over D again writing ``w @ M`` into ``y``.
  The backward's row kernel does the same with ``G @ M^T (+ grad_w)``, the epilogue backward on
  chip (``_row_backward``), and ``grad_x = A @ M - (rowdot/|q|^2) q``.
* **tiled** (any N): the products are split over (row tiles x item tiles x D splits) into a
  float32 workspace, the row epilogue runs over chunks of 256 items with multi-pass (online
  softmax) reductions, and a third kernel forms ``w @ M`` (or ``A @ M``) over (row tiles x D
  tiles), looping over item chunks. No limit on N.

``PATH = "auto"`` takes the fused path when ``N_PAD <= MAX_FUSED_N`` and the 16-row programs
fill the GPU (``ceil(B*Q/16) >= SM count``); otherwise (large N, or few queries on a large GPU:
DAAD's B*Q = 512 on 132 SMs) the tiled path, whose D splits keep every SM busy.

The gradient of the memory, ``gM = w^T G + A^T Q - diag(coldot/|m|^2) M`` (A = dL/ds scaled by
``1/(|q| |m_i|)`` for cosine), comes from one kernel over (item tiles x D tiles) that loops over
all query rows in a fixed order; the per-item ``coldot`` sums arrive as partial rows, one per
group of ``PART_ROWS = 16`` query rows whatever the tile sizes, also reduced in a fixed order. No
float atomics anywhere: two runs give the same bits.

Saved for the backward: ``w`` (and ``p`` for MemAE), per row |q| and lse, per item |m| (the
outputs ``row_stats`` and ``item_norms``); never a B*Q*D copy. The backward recovers the
similarities as ``s_i = T (log w_i + lse)`` (see csrc/block_memory.h), so it needs four products.

Autotuning: every kernel with a tile choice is ``triton.autotune``d keyed on (N, D), its
configurations pruned by ``early_config_prune`` to those whose pipelined tiles fit the GPU's shared
memory (and, for the fused kernels, whose float32 BLOCK_R x N_PAD tile fits the registers).
``AUTOTUNE = False`` (``DAAD_TRITON_AUTOTUNE=0``) takes the first configuration that fits instead
of benchmarking them all (compile time; the GPU tests).

Precision: float32 inputs use ``tl.dot`` in TF32 when PyTorch allows it
(``torch.backends.cuda.matmul.allow_tf32`` or ``torch.get_float32_matmul_precision() != "highest"``)
and in full float32 otherwise; float16/bfloat16 use their tensor-core dots; accumulation and all
statistics are float32. Products involving ``A`` (float32) run in float32/TF32.

Availability: CUDA tensors of float32/float16/bfloat16; CPU tensors of float32 only when
``TRITON_INTERPRET=1`` was set before this module was imported (Triton's interpreter, for tests).
If Triton is missing, the backend is simply unavailable.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import ops
from .spec import MEMAE_EPS, NORM_EPS, Division

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAS_TRITON = True
except Exception:  # noqa: BLE001  (no triton, or a broken install: the backend is unavailable)
    HAS_TRITON = False

FORWARD = "daad_ext::block_memory_forward_triton"
BACKWARD = "daad_ext::block_memory_backward_triton"
#: Largest padded N (a power of two) that the single-pass fused kernels take.
MAX_FUSED_N = 1024
#: "auto", "fused" or "tiled": tests and benchmarks force a path (DAAD_TRITON_PATH); "fused" still
#: takes the tiled path when N_PAD > MAX_FUSED_N.
PATH = os.environ.get("DAAD_TRITON_PATH", "auto")
#: D splits of the tiled path's products; None chooses from the SM count.
SPLITS: Optional[int] = None
#: Each D split of the tiled path covers a multiple of this many columns.
SPLIT_ALIGN = 64
#: Benchmark the pruned configurations (keyed on N, D); False (DAAD_TRITON_AUTOTUNE=0) takes the
#: first that fits, which saves compile time (tests on a GPU).
AUTOTUNE = os.environ.get("DAAD_TRITON_AUTOTUNE", "1") != "0"
#: Under the interpreter the autotuners run one configuration: the smallest tiles, or the largest
#: with "large" (tests cover both).
INTERPRETER_TILES = "small"
#: Rows per partial row of the per-item sums of the cosine backward (the smallest BLOCK_R).
PART_ROWS = 16
#: Shared memory per block for the autotuning filter; None asks the current GPU.
SMEM_LIMIT: Optional[int] = None
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHRINK_CODES = {"hard": 0, "memae": 1, "none": 2}
INTERPRETED = False
CUDA_AVAILABLE = False


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors of float32/float16/bfloat16; CPU float32 under Triton's interpreter.

    Reads constants fixed at import, so that torch.compile traces the backend choice as one.
    """
    if device.type == "cuda":
        return CUDA_AVAILABLE and dtype in SUPPORTED_DTYPES
    return device.type == "cpu" and dtype == torch.float32 and INTERPRETED


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _allow_tf32(dtype: torch.dtype) -> bool:
    """Whether float32 products may use TF32 (PyTorch's matmul precision setting)."""
    return dtype == torch.float32 and (torch.backends.cuda.matmul.allow_tf32
                                       or torch.get_float32_matmul_precision() != "highest")


def _nchw_strides(t: torch.Tensor, g: Division) -> tuple[int, ...]:
    """(sb, s_blk_c, s_blk_h, s_blk_w, sc, sh, sw): strides of a block's origin and inside it."""
    sb, sc, sh, sw = (int(st) for st in t.stride())
    return (sb, g.bc * sc, g.bh * sh, g.bw * sw, sc, sh, sw)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _smem_limit() -> int:
    if SMEM_LIMIT is not None:
        return SMEM_LIMIT
    if INTERPRETED or not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)


def _use_fused(rows: int, n_pad: int, device: torch.device) -> bool:
    if n_pad > MAX_FUSED_N or PATH == "tiled":
        return False
    if PATH == "fused":
        return True
    # A fused program owns >= 16 rows and all of D: it pays off once those programs fill the GPU.
    return _cdiv(rows, 16) >= _num_sms(device)


def _splits(rows: int, n: int, d: int, device: torch.device) -> int:
    most = _cdiv(d, SPLIT_ALIGN)
    if SPLITS is not None:
        return max(1, min(SPLITS, most))
    if device.type != "cuda":
        return min(2, most)
    tiles = _cdiv(rows, 64) * _cdiv(n, 64)
    return max(1, min(_cdiv(2 * _num_sms(device), tiles), most))


if HAS_TRITON:
    #: Kernels defined for Triton's interpreter (TRITON_INTERPRET=1 at import): CPU tensors.
    INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
    CUDA_AVAILABLE = torch.cuda.is_available() and not INTERPRETED

    # ---------------------------------------------------------------------------------------------
    # Autotuning: configurations keyed on (N, D), pruned to those that fit shared memory and keep
    # the float32 (rows x N_PAD) tile in registers. The interpreter runs one small configuration.
    # ---------------------------------------------------------------------------------------------
    def _configs(block_names, rows):
        """triton.Configs from (block sizes..., num_warps, num_stages) rows, in preference order."""
        return [triton.Config(dict(zip(block_names, row[:-2])), num_warps=row[-2],
                              num_stages=row[-1]) for row in rows]

    def _interpreter_pick(configs):
        pick = max if INTERPRETER_TILES == "large" else min
        return [pick(configs, key=lambda c: tuple(c.kwargs.values()))]

    def _finish_prune(configs, keep):
        """Drops the interpreter's all-16 tiles on a GPU unless nothing else fits; without
        autotuning keeps the first (preferred) survivor."""
        big = [c for c in keep if any(v > 16 for v in c.kwargs.values())]
        keep = big or keep or [min(configs, key=lambda c: tuple(c.kwargs.values()))]
        return keep if AUTOTUNE else keep[:1]

    def _fused_prune(configs, named_args, **kwargs):
        """Fused kernels: the M tile (N_PAD x BLOCK_D) and the query tile per pipeline stage must
        fit shared memory, and the float32 (BLOCK_R x N_PAD) tile at most 64 registers a thread."""
        args = {**named_args, **kwargs}
        if INTERPRETED:
            return _interpreter_pick(configs)
        n_pad, elt = int(args["N_PAD"]), int(args["ELT"])
        if args.get("F32_DOT", False):
            elt = 4
        limit, keep = _smem_limit(), []
        for c in configs:
            br, bd = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_D"]
            smem = c.num_stages * (br + n_pad) * bd * elt
            regs = br * n_pad // (32 * c.num_warps)
            if smem <= limit and regs <= 64:
                keep.append(c)
        return _finish_prune(configs, keep)

    def _tile_prune(configs, named_args, **kwargs):
        """Tiled kernels: both operand tiles per pipeline stage must fit shared memory (float32
        counted, as some products run on float32 operands)."""
        if INTERPRETED:
            return _interpreter_pick(configs)
        limit, keep = _smem_limit(), []
        for c in configs:
            k = c.kwargs
            if "BLOCK_K" in k:  # (rows or items) x BLOCK_K times BLOCK_K x BLOCK_D
                tiles = (k.get("BLOCK_R", 0) + k.get("BLOCK_N", 0) + k["BLOCK_D"]) * k["BLOCK_K"]
                if "BLOCK_N" in k:  # _grad_memory_kernel: two products per step
                    tiles *= 2
            else:  # BLOCK_R x BLOCK_D times BLOCK_D x BLOCK_N
                tiles = (k["BLOCK_R"] + k["BLOCK_N"]) * k["BLOCK_D"]
            if c.num_stages * tiles * 4 <= limit:
                keep.append(c)
        return _finish_prune(configs, keep)

    # A few configurations each: every one that fits is compiled once per kernel variant, and
    # compile time adds up (the last, all-16 one is the interpreter's).
    _FUSED_CONFIGS = _configs(("BLOCK_R", "BLOCK_D"), [
        (16, 32, 4, 2), (32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2),
        (16, 16, 4, 2)])
    _SIM_CONFIGS = _configs(("BLOCK_R", "BLOCK_N", "BLOCK_D"), [
        (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 8, 3), (16, 16, 16, 4, 2)])
    _RM_CONFIGS = _configs(("BLOCK_R", "BLOCK_D", "BLOCK_K"), [
        (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (16, 16, 16, 4, 2)])
    _GM_CONFIGS = _configs(("BLOCK_N", "BLOCK_D", "BLOCK_K"), [
        (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (16, 16, 16, 4, 2)])
    _FUSED_PRUNE = {"early_config_prune": _fused_prune}
    _TILE_PRUNE = {"early_config_prune": _tile_prune}

    # ---------------------------------------------------------------------------------------------
    # Addressing of the blocks inside a (B, C, H, W) tensor of any strides.
    # ---------------------------------------------------------------------------------------------
    @triton.jit
    def _row_offsets(rows, Q, RW, RHW, sb, sbc, sbh, sbw):
        """Offset (int64) of the first element of block ``k`` of image ``b``, rows ``r = b*Q + k``.

        Index arithmetic in int32 (cheap divisions); only the image offset needs 64 bits.
        """
        b = rows // Q
        k = rows % Q
        return (b.to(tl.int64) * sb
                + ((k // RHW) * sbc + ((k % RHW) // RW) * sbh + (k % RW) * sbw).to(tl.int64))

    @triton.jit
    def _col_offsets(cols, BW, BHW, sc, sh, sw):
        """Offset of element d = (c*bh + y)*bw + x inside a block (within one image: int32)."""
        return (cols // BHW) * sc + ((cols % BHW) // BW) * sh + (cols % BW) * sw

    # ---------------------------------------------------------------------------------------------
    # Element-wise pieces of csrc/block_memory.h.
    # ---------------------------------------------------------------------------------------------
    NORM_EPS_C = tl.constexpr(NORM_EPS)
    MEMAE_EPS_C = tl.constexpr(MEMAE_EPS)

    @triton.jit
    def _clamp_norm(norm):
        return tl.where(norm >= NORM_EPS_C, norm, NORM_EPS_C)

    @triton.jit
    def _norm_correction(norm, dot):
        ok = norm >= NORM_EPS_C
        return tl.where(ok, dot / tl.where(ok, norm * norm, 1.0), 0.0)

    @triton.jit
    def _zero_keeping_nan(v):
        """0 for a number, NaN for NaN (what the reference's 0/1 mask or relu gives): a NaN row
        stays NaN through the shrinkage."""
        return tl.where(v == v, 0.0, v)

    @triton.jit
    def _memae_shrink(p, lam):
        a = p - lam
        return tl.where(a > 0.0, a * p / (a + MEMAE_EPS_C), _zero_keeping_nan(a))

    @triton.jit
    def _memae_shrink_grad(p, lam):
        a = p - lam
        e = MEMAE_EPS_C
        return tl.where(a > 0.0, (a * a + a * e + p * e) / ((a + e) * (a + e)), 0.0)

    @triton.jit
    def _recover_similarity(weight, lse, temperature):
        return temperature * (tl.log(weight) + lse)

    @triton.jit
    def _mma(a, b, acc, TF32: tl.constexpr):
        """acc + a @ b; float32 operands in TF32 or in full precision (a bool constexpr, not a
        string one, for torch.compile's sake). Half operands use their own tensor-core dots."""
        if TF32:
            return tl.dot(a, b, acc, input_precision="tf32")
        else:
            return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def _cosine_scale(v, qn, mnorm_ptr, items, item_mask):
        """v / (|q| |m_i|) on a (rows x items) tile, both norms clamped."""
        mn = tl.load(mnorm_ptr + items, mask=item_mask, other=1.0)
        return v / (_clamp_norm(qn)[:, None] * _clamp_norm(mn)[None, :])

    @triton.jit
    def _store_stats(stats_ptr, rows, row_mask, qn, lse):
        tl.store(stats_ptr + rows * 2, qn, mask=row_mask)
        tl.store(stats_ptr + rows * 2 + 1, lse, mask=row_mask)

    @triton.jit
    def _load_stats(stats_ptr, rows, row_mask):
        """(|q|, lse) of the rows."""
        return (tl.load(stats_ptr + rows * 2, mask=row_mask, other=0.0),
                tl.load(stats_ptr + rows * 2 + 1, mask=row_mask, other=0.0))

    # ---------------------------------------------------------------------------------------------
    # Tiles and the loops over D shared by the fused and tiled kernels (inlined into them, in the
    # manner of the fused-attention tutorial's _attn_fwd_inner).
    # ---------------------------------------------------------------------------------------------
    @triton.jit
    def _load_nchw(ptr, row_off, cols, mask, BW, BHW, sc, sh, sw):
        """The (rows x cols) tile of an NCHW operand, rows at block origins ``row_off``."""
        return tl.load(ptr + row_off[:, None] + _col_offsets(cols, BW, BHW, sc, sh, sw)[None, :],
                       mask=mask, other=0.0)

    @triton.jit
    def _store_nchw(ptr, row_off, cols, value, mask, BW, BHW, sc, sh, sw):
        """Stores a (rows x cols) tile into an NCHW tensor, in its dtype."""
        tl.store(ptr + row_off[:, None] + _col_offsets(cols, BW, BHW, sc, sh, sw)[None, :],
                 value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_items(m_ptr, mrow, cols, item_mask, col_mask, smd):
        """The (items x cols) tile of M, items at offsets ``mrow``."""
        return tl.load(m_ptr + mrow[:, None] + cols[None, :] * smd,
                       mask=item_mask[:, None] & col_mask[None, :], other=0.0)

    @triton.jit
    def _query_item_dots(acc, qsq, x_ptr, xrow, row_mask, m_ptr, mrow, item_mask, d_start, d_end,
                         BW, BHW, sxc, sxh, sxw, smd,
                         ACC_SQ: tl.constexpr, TF32: tl.constexpr, BLOCK_D: tl.constexpr):
        """acc + X[rows, d_start:d_end] @ M[items, d_start:d_end]^T, X's tiles read straight from
        NCHW; with ACC_SQ, qsq + the rows' squares summed over the same columns."""
        for d0 in range(d_start, d_end, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < d_end
            q = _load_nchw(x_ptr, xrow, cols, row_mask[:, None] & col_mask[None, :],
                           BW, BHW, sxc, sxh, sxw)
            m = _load_items(m_ptr, mrow, cols, item_mask, col_mask, smd)
            acc = _mma(q, tl.trans(m), acc, TF32)
            if ACC_SQ:
                qf = q.to(tl.float32)
                qsq += tl.sum(qf * qf, axis=1)
        return acc, qsq

    @triton.jit
    def _correct_and_store(acc, out_ptr, orow, x_ptr, xrow, corr, cols, mask,
                           BW, BHW, sxc, sxh, sxw, soc, soh, sow, CORRECT: tl.constexpr):
        """out[rows, cols] = acc (- corr * q with CORRECT), q and out in NCHW."""
        if CORRECT:
            q = _load_nchw(x_ptr, xrow, cols, mask, BW, BHW, sxc, sxh, sxw)
            acc -= corr[:, None] * q.to(tl.float32)
        _store_nchw(out_ptr, orow, cols, acc, mask, BW, BHW, soc, soh, sow)

    @triton.jit
    def _rows_times_items(a, m_ptr, mrow, item_mask, out_ptr, orow, x_ptr, xrow, corr, row_mask,
                          D, BW, BHW, sxc, sxh, sxw, soc, soh, sow, smd,
                          CORRECT: tl.constexpr, TF32: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        """out = a @ M (- corr * q) over all of D, a (rows x all items) on chip; M's tiles in a's
        dtype."""
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            m = _load_items(m_ptr, mrow, cols, item_mask, col_mask, smd)
            out = _mma(a, m.to(a.dtype), tl.zeros((BLOCK_R, BLOCK_D), tl.float32), TF32)
            _correct_and_store(out, out_ptr, orow, x_ptr, xrow, corr, cols,
                               row_mask[:, None] & col_mask[None, :],
                               BW, BHW, sxc, sxh, sxw, soc, soh, sow, CORRECT)

    # ---------------------------------------------------------------------------------------------
    # Row epilogue on a (BLOCK_R, N_PAD) tile holding whole rows (fused path).
    # ---------------------------------------------------------------------------------------------
    @triton.jit
    def _row_forward(z, item_mask, lam, SHRINK: tl.constexpr):
        """Logits -> (w, p, lse); padded items must hold -inf. Mirrors row_forward()."""
        zmax = tl.max(z, axis=1)
        e = tl.exp(z - zmax[:, None])
        total_e = tl.sum(e, axis=1)
        lse_all = zmax + tl.log(total_e)
        p = e / total_e[:, None]
        pmax = tl.max(p, axis=1)
        if SHRINK == 2:
            w = p
            lse = lse_all
        elif SHRINK == 0:
            # Keep p_i >= lam and the row maximum, so that no row is empty.
            keep = ((p >= lam) | (p == pmax[:, None])) & item_mask[None, :]
            kept = tl.sum(tl.where(keep, p, _zero_keeping_nan(p)), axis=1)
            w = tl.where(keep, p / kept[:, None], _zero_keeping_nan(p))
            lse = lse_all + tl.log(kept)
        else:
            u = _memae_shrink(p, lam)
            total = tl.sum(u, axis=1)
            denom = tl.where(total >= MEMAE_EPS_C, total, MEMAE_EPS_C)
            w = u / denom[:, None]
            lse = lse_all
        return w, p, lse

    @triton.jit
    def _memae_grad_p(g, p, gw_dot, total, lam):
        """MemAE's dL/dp from dL/dw, <dL/dw, w> and the shrunk total of each row."""
        safe_total = tl.where(total >= MEMAE_EPS_C, total, 1.0)
        gu = tl.where(total[:, None] >= MEMAE_EPS_C,
                      (g - gw_dot[:, None]) / safe_total[:, None], g / MEMAE_EPS_C)
        return gu * _memae_shrink_grad(p, lam)

    @triton.jit
    def _similarity_grad(g, w, p, gw_dot, total, gp_dot, lam, temperature, SHRINK: tl.constexpr):
        """(dL/ds, the weight it rests on: p for MemAE, w otherwise) of a (rows x items) tile."""
        if SHRINK == 1:
            gs = p * (_memae_grad_p(g, p, gw_dot, total, lam) - gp_dot[:, None]) / temperature
            weight = p
        else:
            gs = w * (g - gw_dot[:, None]) / temperature
            weight = w
        return gs, weight

    @triton.jit
    def _grad_times_similarity(gs, weight, lse, temperature):
        """dL/ds * s where the weight is > 0 (s recovered from the weight and lse), else 0."""
        s = _recover_similarity(tl.where(weight > 0.0, weight, 1.0), lse[:, None], temperature)
        return tl.where(weight > 0.0, gs * s, 0.0)

    @triton.jit
    def _row_backward(g, w, p, lse, lam, temperature, SHRINK: tl.constexpr,
                      NEED_PROD: tl.constexpr):
        """dL/dw -> (dL/ds, dL/ds * s where the weight is > 0). Mirrors row_backward()."""
        gw_dot = tl.sum(g * w, axis=1)
        if SHRINK == 1:
            total = tl.sum(_memae_shrink(p, lam), axis=1)
            gp_dot = tl.sum(_memae_grad_p(g, p, gw_dot, total, lam) * p, axis=1)
        else:
            total = gw_dot  # unused
            gp_dot = gw_dot  # unused
        gs, weight = _similarity_grad(g, w, p, gw_dot, total, gp_dot, lam, temperature, SHRINK)
        if NEED_PROD:
            prod = _grad_times_similarity(gs, weight, lse, temperature)
        else:
            prod = gs
        return gs, prod

    # ---------------------------------------------------------------------------------------------
    # Small kernels.
    # ---------------------------------------------------------------------------------------------
    @triton.jit
    def _item_norms_kernel(m_ptr, out_ptr, N, D, smn, smd, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        items = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = tl.load(m_ptr + items[:, None].to(tl.int64) * smn + cols[None, :] * smd,
                        mask=(items[:, None] < N) & (cols[None, :] < D), other=0.0).to(tl.float32)
            acc += tl.sum(m * m, axis=1)
        tl.store(out_ptr + items, tl.sqrt(acc), mask=items < N)

    # ---------------------------------------------------------------------------------------------
    # Fused forward: one kernel per BLOCK_R queries.
    # ---------------------------------------------------------------------------------------------
    @triton.autotune(configs=_FUSED_CONFIGS, key=["N", "D"], prune_configs_by=_FUSED_PRUNE)
    @triton.jit
    def _fwd_fused_kernel(
            x_ptr, m_ptr, mnorm_ptr, y_ptr, w_ptr, p_ptr, stats_ptr,
            R, N, D, Q, RW, RHW, BW, BHW,
            sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw,
            syb, sybc, sybh, sybw, syc, syh, syw,
            smn, smd, lam, temperature,
            COSINE: tl.constexpr, SHRINK: tl.constexpr, STORE_P: tl.constexpr,
            TF32: tl.constexpr, N_PAD: tl.constexpr, ELT: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        items = tl.arange(0, N_PAD)
        item_mask = items < N
        xrow = _row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
        mrow = items.to(tl.int64) * smn
        s, qsq = _query_item_dots(tl.zeros((BLOCK_R, N_PAD), tl.float32),
                                  tl.zeros((BLOCK_R,), tl.float32), x_ptr, xrow, row_mask,
                                  m_ptr, mrow, item_mask, 0, D, BW, BHW, sxc, sxh, sxw, smd,
                                  True, TF32, BLOCK_D)
        qn = tl.sqrt(qsq)
        if COSINE:
            s = _cosine_scale(s, qn, mnorm_ptr, items, item_mask)
        z = tl.where(item_mask[None, :], s / temperature, float("-inf"))
        w, p, lse = _row_forward(z, item_mask, lam, SHRINK)
        rn = rows.to(tl.int64)[:, None] * N + items[None, :]
        tile_mask = row_mask[:, None] & item_mask[None, :]
        tl.store(w_ptr + rn, w.to(w_ptr.dtype.element_ty), mask=tile_mask)
        if STORE_P:
            tl.store(p_ptr + rn, p.to(p_ptr.dtype.element_ty), mask=tile_mask)
        _store_stats(stats_ptr, rows, row_mask, qn, lse)
        # Second pass over D: y = w @ M, written straight into the NCHW output.
        yrow = _row_offsets(rows, Q, RW, RHW, syb, sybc, sybh, sybw)
        _rows_times_items(w.to(m_ptr.dtype.element_ty), m_ptr, mrow, item_mask, y_ptr, yrow,
                          x_ptr, xrow, qn, row_mask, D, BW, BHW, sxc, sxh, sxw, syc, syh, syw,
                          smd, False, TF32, BLOCK_R, BLOCK_D)

    # ---------------------------------------------------------------------------------------------
    # Fused backward, row part: dL/dw = G @ M^T (+ grad_w), the epilogue backward on chip,
    # A (float32) and the coldot partials stored, then grad_x = A @ M - (rowdot/|q|^2) q.
    # ---------------------------------------------------------------------------------------------
    @triton.autotune(configs=_FUSED_CONFIGS, key=["N", "D"], prune_configs_by=_FUSED_PRUNE)
    @triton.jit
    def _bwd_fused_kernel(
            gy_ptr, gw_ptr, x_ptr, m_ptr, w_ptr, p_ptr, stats_ptr, mnorm_ptr,
            a_ptr, colpart_ptr, gx_ptr,
            R, N, D, Q, RW, RHW, BW, BHW,
            sgb, sgbc, sgbh, sgbw, sgc, sgh, sgw,
            sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw,
            sob, sobc, sobh, sobw, soc, soh, sow,
            smn, smd, lam, temperature, NUM_PARTS,
            HAS_GY: tl.constexpr, HAS_GW: tl.constexpr, COSINE: tl.constexpr,
            SHRINK: tl.constexpr, TF32: tl.constexpr, A_TF32: tl.constexpr,
            N_PAD: tl.constexpr, ELT: tl.constexpr, F32_DOT: tl.constexpr,
            PART_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
            grow = _row_offsets(rows, Q, RW, RHW, sgb, sgbc, sgbh, sgbw)
            g, _ = _query_item_dots(g, tl.zeros((BLOCK_R,), tl.float32), gy_ptr, grow, row_mask,
                                    m_ptr, mrow, item_mask, 0, D, BW, BHW, sgc, sgh, sgw, smd,
                                    False, TF32, BLOCK_D)
        if HAS_GW:
            g += tl.load(gw_ptr + rn, mask=tile_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rn, mask=tile_mask, other=0.0).to(tl.float32)
        if SHRINK == 1:
            p = tl.load(p_ptr + rn, mask=tile_mask, other=0.0).to(tl.float32)
        else:
            p = w
        qn, lse = _load_stats(stats_ptr, rows, row_mask)
        gs, prod = _row_backward(g, w, p, lse, lam, temperature, SHRINK, COSINE)
        if COSINE:
            rowdot = tl.sum(prod, axis=1)
            # Per-item partial sums over each group of PART_ROWS rows: the same groups whatever
            # BLOCK_R the autotuner picks, so every partial row is written and the fixed-order
            # reduction in _grad_memory_kernel gives the same bits for every configuration.
            parts = tl.sum(tl.reshape(prod, (BLOCK_R // PART_ROWS, PART_ROWS, N_PAD)), axis=1)
            part_ids = pid * (BLOCK_R // PART_ROWS) + tl.arange(0, BLOCK_R // PART_ROWS)
            tl.store(colpart_ptr + part_ids.to(tl.int64)[:, None] * N + items[None, :], parts,
                     mask=(part_ids < NUM_PARTS)[:, None] & item_mask[None, :])
            a = _cosine_scale(gs, qn, mnorm_ptr, items, item_mask)
            corr = _norm_correction(qn, rowdot)
        else:
            a = gs
            corr = qn  # unused
        tl.store(a_ptr + rn, a, mask=tile_mask)
        xrow = _row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
        orow = _row_offsets(rows, Q, RW, RHW, sob, sobc, sobh, sobw)
        _rows_times_items(a, m_ptr, mrow, item_mask, gx_ptr, orow, x_ptr, xrow, corr, row_mask,
                          D, BW, BHW, sxc, sxh, sxw, soc, soh, sow, smd,
                          COSINE, A_TF32, BLOCK_R, BLOCK_D)

    # ---------------------------------------------------------------------------------------------
    # Tiled path, 1/3: partial products over (row tiles x item tiles x D splits) of an NCHW
    # operand (x or grad_y) with M^T, into ws[split, r, i]; the query norms' partial squares too.
    # ---------------------------------------------------------------------------------------------
    @triton.autotune(configs=_SIM_CONFIGS, key=["N", "D"], prune_configs_by=_TILE_PRUNE)
    @triton.jit
    def _products_kernel(
            x_ptr, m_ptr, ws_ptr, sq_ptr,
            R, N, D, Q, RW, RHW, BW, BHW, SPLIT_D,
            sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw, smn, smd,
            STORE_SQ: tl.constexpr, TF32: tl.constexpr, ELT: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        items = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        item_mask = items < N
        xrow = _row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
        mrow = items.to(tl.int64) * smn
        d_start = split * SPLIT_D
        d_end = tl.minimum(d_start + SPLIT_D, D)
        acc, qsq = _query_item_dots(tl.zeros((BLOCK_R, BLOCK_N), tl.float32),
                                    tl.zeros((BLOCK_R,), tl.float32), x_ptr, xrow, row_mask,
                                    m_ptr, mrow, item_mask, d_start, d_end,
                                    BW, BHW, sxc, sxh, sxw, smd, STORE_SQ, TF32, BLOCK_D)
        base = split.to(tl.int64) * R * N
        tl.store(ws_ptr + base + rows.to(tl.int64)[:, None] * N + items[None, :], acc,
                 mask=row_mask[:, None] & item_mask[None, :])
        if STORE_SQ:
            if pid_n == 0:
                tl.store(sq_ptr + split * R + rows, qsq, mask=row_mask)

    @triton.jit
    def _item_chunk(n0, r64, row_mask, N, BLOCK_N: tl.constexpr):
        """(items, item_mask, tile mask, offsets r*N + i) of the item chunk at n0."""
        items = n0 + tl.arange(0, BLOCK_N)
        item_mask = items < N
        mask = row_mask[:, None] & item_mask[None, :]
        return items, item_mask, mask, r64[:, None] * N + items[None, :]

    @triton.jit
    def _reduced_chunk(ws_ptr, rn, mask, RN, SPLITS):
        """Sum of the D splits' partial products (splits RN apart), in split order."""
        acc = tl.load(ws_ptr + rn, mask=mask, other=0.0)
        part_ptr = ws_ptr
        for _ in range(1, SPLITS):
            part_ptr += RN
            acc += tl.load(part_ptr + rn, mask=mask, other=0.0)
        return acc

    # ---------------------------------------------------------------------------------------------
    # Tiled path, 2/3: the row epilogue over item chunks (multi-pass, online softmax).
    # ---------------------------------------------------------------------------------------------
    @triton.jit
    def _rows_forward_kernel(
            ws_ptr, sq_ptr, mnorm_ptr, w_ptr, p_ptr, stats_ptr,
            R, N, SPLITS, lam, temperature,
            COSINE: tl.constexpr, SHRINK: tl.constexpr, STORE_P: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        r64 = rows.to(tl.int64)
        qsq = tl.load(sq_ptr + rows, mask=row_mask, other=0.0)
        for sp in range(1, SPLITS):
            qsq += tl.load(sq_ptr + sp * R + rows, mask=row_mask, other=0.0)
        qn = tl.sqrt(qsq)
        # Pass 1: logits (kept in split 0 of the workspace), running max and sum of exponentials.
        zmax = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        total_e = tl.zeros((BLOCK_R,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
            s = _reduced_chunk(ws_ptr, rn, mask, R * N, SPLITS)
            if COSINE:
                s = _cosine_scale(s, qn, mnorm_ptr, items, item_mask)
            z = tl.where(item_mask[None, :], s / temperature, float("-inf"))
            tl.store(ws_ptr + rn, z, mask=mask)
            new_max = tl.maximum(zmax, tl.max(z, axis=1))
            total_e = (total_e * tl.exp(zmax - new_max)
                       + tl.sum(tl.exp(z - new_max[:, None]), axis=1))
            zmax = new_max
        lse_all = zmax + tl.log(total_e)
        pmax = 1.0 / total_e  # p of the row maximum, exp(0) / sum
        # Pass 2: the kept mass (hard) or the shrunk total (memae).
        kept = tl.zeros((BLOCK_R,), tl.float32)
        if SHRINK != 2:
            for n0 in range(0, N, BLOCK_N):
                items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
                z = tl.load(ws_ptr + rn, mask=mask, other=float("-inf"))
                p = tl.exp(z - zmax[:, None]) / total_e[:, None]
                if SHRINK == 0:
                    keep = ((p >= lam) | (p == pmax[:, None])) & item_mask[None, :]
                    kept += tl.sum(tl.where(keep, p, _zero_keeping_nan(p)), axis=1)
                else:
                    kept += tl.sum(_memae_shrink(p, lam), axis=1)
        if SHRINK == 0:
            lse = lse_all + tl.log(kept)
        else:
            lse = lse_all
        denom = tl.where(kept >= MEMAE_EPS_C, kept, MEMAE_EPS_C)
        # Pass 3: the weights.
        for n0 in range(0, N, BLOCK_N):
            items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
            z = tl.load(ws_ptr + rn, mask=mask, other=float("-inf"))
            p = tl.exp(z - zmax[:, None]) / total_e[:, None]
            if SHRINK == 2:
                w = p
            elif SHRINK == 0:
                keep = ((p >= lam) | (p == pmax[:, None])) & item_mask[None, :]
                w = tl.where(keep, p / kept[:, None], _zero_keeping_nan(p))
            else:
                w = _memae_shrink(p, lam) / denom[:, None]
            tl.store(w_ptr + rn, w.to(w_ptr.dtype.element_ty), mask=mask)
            if STORE_P:
                tl.store(p_ptr + rn, p.to(p_ptr.dtype.element_ty), mask=mask)
        _store_stats(stats_ptr, rows, row_mask, qn, lse)

    @triton.jit
    def _rows_backward_kernel(
            ws_ptr, gw_ptr, w_ptr, p_ptr, stats_ptr, mnorm_ptr, a_ptr, colpart_ptr, rowdot_ptr,
            R, N, SPLITS, lam, temperature,
            HAS_GY: tl.constexpr, HAS_GW: tl.constexpr, COSINE: tl.constexpr,
            SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        r64 = rows.to(tl.int64)
        qn, lse = _load_stats(stats_ptr, rows, row_mask)
        # Pass 1: dL/dw (kept in split 0 of the workspace), <g, w> and MemAE's total.
        gw_dot = tl.zeros((BLOCK_R,), tl.float32)
        total = tl.zeros((BLOCK_R,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
            if HAS_GY:
                g = _reduced_chunk(ws_ptr, rn, mask, R * N, SPLITS)
            else:
                g = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
            if HAS_GW:
                g += tl.load(gw_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            tl.store(ws_ptr + rn, g, mask=mask)
            w = tl.load(w_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            gw_dot += tl.sum(g * w, axis=1)
            if SHRINK == 1:
                p = tl.load(p_ptr + rn, mask=mask, other=0.0).to(tl.float32)
                total += tl.sum(_memae_shrink(p, lam), axis=1)
        # Pass 2 (MemAE): <dL/dp, p>.
        gp_dot = tl.zeros((BLOCK_R,), tl.float32)
        if SHRINK == 1:
            for n0 in range(0, N, BLOCK_N):
                items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
                g = tl.load(ws_ptr + rn, mask=mask, other=0.0)
                p = tl.load(p_ptr + rn, mask=mask, other=0.0).to(tl.float32)
                gp_dot += tl.sum(_memae_grad_p(g, p, gw_dot, total, lam) * p, axis=1)
        # Pass 3: dL/ds, A, rowdot and the per-item partial sums of dL/ds * s.
        rowdot = tl.zeros((BLOCK_R,), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            items, item_mask, mask, rn = _item_chunk(n0, r64, row_mask, N, BLOCK_N)
            g = tl.load(ws_ptr + rn, mask=mask, other=0.0)
            w = tl.load(w_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            if SHRINK == 1:
                p = tl.load(p_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            else:
                p = w
            gs, weight = _similarity_grad(g, w, p, gw_dot, total, gp_dot, lam, temperature, SHRINK)
            if COSINE:
                prod = _grad_times_similarity(gs, weight, lse, temperature)
                rowdot += tl.sum(prod, axis=1)
                tl.store(colpart_ptr + pid.to(tl.int64) * N + items, tl.sum(prod, axis=0),
                         mask=item_mask)
                a = _cosine_scale(gs, qn, mnorm_ptr, items, item_mask)
            else:
                a = gs
            tl.store(a_ptr + rn, a, mask=mask)
        tl.store(rowdot_ptr + rows, _norm_correction(qn, rowdot), mask=row_mask)

    # ---------------------------------------------------------------------------------------------
    # Tiled path, 3/3: out = A @ M (- corr * q), A (R x N) row-major, out written into NCHW.
    # Forward: A = w, no correction. Backward: A = dL/ds (scaled), corr = rowdot/|q|^2 (cosine).
    # ---------------------------------------------------------------------------------------------
    @triton.autotune(configs=_RM_CONFIGS, key=["N", "D"], prune_configs_by=_TILE_PRUNE)
    @triton.jit
    def _rows_times_memory_kernel(
            a_ptr, m_ptr, x_ptr, corr_ptr, out_ptr,
            R, N, D, Q, RW, RHW, BW, BHW,
            sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw,
            sob, sobc, sobh, sobw, soc, soh, sow, smn, smd,
            CORRECT: tl.constexpr, F32_DOT: tl.constexpr, TF32: tl.constexpr,
            ELT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_K: tl.constexpr):
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
            m = _load_items(m_ptr, items.to(tl.int64) * smn, cols, item_mask, col_mask, smd)
            if F32_DOT:
                acc = _mma(a.to(tl.float32), m.to(tl.float32), acc, TF32)
            else:
                acc = _mma(a.to(m.dtype), m, acc, TF32)
        if CORRECT:
            corr = tl.load(corr_ptr + rows, mask=row_mask, other=0.0)
        else:
            corr = tl.zeros((BLOCK_R,), tl.float32)  # unused
        xrow = _row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
        orow = _row_offsets(rows, Q, RW, RHW, sob, sobc, sobh, sobw)
        _correct_and_store(acc, out_ptr, orow, x_ptr, xrow, corr, cols,
                           row_mask[:, None] & col_mask[None, :],
                           BW, BHW, sxc, sxh, sxw, soc, soh, sow, CORRECT)

    # ---------------------------------------------------------------------------------------------
    # Gradient of the memory: gM = w^T G + A^T Q - diag(coldot/|m|^2) M, one program per
    # (item tile, D tile), looping over all query rows in order. Deterministic.
    # ---------------------------------------------------------------------------------------------
    @triton.autotune(configs=_GM_CONFIGS, key=["N", "D"], prune_configs_by=_TILE_PRUNE)
    @triton.jit
    def _grad_memory_kernel(
            w_ptr, a_ptr, gy_ptr, x_ptr, m_ptr, mnorm_ptr, colpart_ptr, gm_ptr,
            R, N, D, Q, RW, RHW, BW, BHW, NUM_PARTS,
            sgb, sgbc, sgbh, sgbw, sgc, sgh, sgw,
            sxb, sxbc, sxbh, sxbw, sxc, sxh, sxw, smn, smd,
            HAS_GY: tl.constexpr, COSINE: tl.constexpr, TF32: tl.constexpr,
            A_TF32: tl.constexpr, ELT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
        items = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        item_mask = items < N
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        gcol = _col_offsets(cols, BW, BHW, sgc, sgh, sgw)
        xcol = _col_offsets(cols, BW, BHW, sxc, sxh, sxw)
        acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for r0 in range(0, R, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            row_mask = rows < R
            nr = rows.to(tl.int64)[None, :] * N + items[:, None]  # (BLOCK_N, BLOCK_K)
            nr_mask = item_mask[:, None] & row_mask[None, :]
            rd_mask = row_mask[:, None] & col_mask[None, :]
            if HAS_GY:
                wt = tl.load(w_ptr + nr, mask=nr_mask, other=0.0)
                grow = _row_offsets(rows, Q, RW, RHW, sgb, sgbc, sgbh, sgbw)
                g = tl.load(gy_ptr + grow[:, None] + gcol[None, :], mask=rd_mask, other=0.0)
                acc = _mma(wt.to(g.dtype), g, acc, TF32)
            at = tl.load(a_ptr + nr, mask=nr_mask, other=0.0)
            xrow = _row_offsets(rows, Q, RW, RHW, sxb, sxbc, sxbh, sxbw)
            q = tl.load(x_ptr + xrow[:, None] + xcol[None, :], mask=rd_mask, other=0.0)
            acc = _mma(at, q.to(tl.float32), acc, A_TF32)
        m = _load_items(m_ptr, items.to(tl.int64) * smn, cols, item_mask, col_mask, smd)
        if COSINE:
            coldot = tl.zeros((BLOCK_N,), tl.float32)
            for part in range(0, NUM_PARTS):
                coldot += tl.load(colpart_ptr + part * N + items, mask=item_mask, other=0.0)
            mn = tl.load(mnorm_ptr + items, mask=item_mask, other=1.0)
            acc -= _norm_correction(mn, coldot)[:, None] * m.to(tl.float32)
        tl.store(gm_ptr + items.to(tl.int64)[:, None] * D + cols[None, :],
                 acc.to(gm_ptr.dtype.element_ty), mask=item_mask[:, None] & col_mask[None, :])

    # ---------------------------------------------------------------------------------------------
    # Host side.
    # ---------------------------------------------------------------------------------------------
    def _geometry(x: torch.Tensor, rh: int, rw: int, rc: int) -> Division:
        # Sizes become plain ints (a symbolic shape specialises): they pick tiles and paths.
        _, c, h, w = (int(size) for size in x.shape)
        return Division(rh, rw, rc, c // rc, h // rh, w // rw)

    def _problem(x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int):
        """(geometry, B, N, D, rows = B*Q)."""
        g = _geometry(x, rh, rw, rc)
        b = int(x.shape[0])
        n, d = int(memory.shape[0]), int(memory.shape[1])
        return g, b, n, d, b * g.num_queries

    def _split_d(rows: int, n: int, d: int, device: torch.device) -> tuple[int, int]:
        """(splits, columns per split) of the tiled path's products."""
        split_d = _cdiv(_cdiv(d, _splits(rows, n, d, device)), SPLIT_ALIGN) * SPLIT_ALIGN
        return _cdiv(d, split_d), split_d

    def _geo_args(g: Division) -> tuple[int, ...]:
        """(Q, RW, RHW, BW, BHW)."""
        return (g.num_queries, g.rw, g.rh * g.rw, g.bw, g.bh * g.bw)

    def _item_norms(memory: torch.Tensor) -> torch.Tensor:
        n, d = int(memory.shape[0]), int(memory.shape[1])
        out = torch.empty(n, device=memory.device, dtype=torch.float32)
        wrap_triton(_item_norms_kernel)[(_cdiv(n, 64),)](
            memory, out, n, d, memory.stride(0), memory.stride(1), BLOCK_N=64, BLOCK_D=64)
        return out

    def _row_tile(n: int) -> tuple[int, int]:
        """(BLOCK_R, BLOCK_N) of the tiled path's row-epilogue kernels."""
        return PART_ROWS, min(max(16, _next_pow2(n)), 256)

    @triton_op(FORWARD, mutates_args=())
    def block_memory_forward_triton(
            x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int, similarity: str,
            shrink: str, threshold: float, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g, b, n, d, rows = _problem(x, memory, rh, rw, rc)
        memae = shrink == "memae"
        cosine = similarity == "cosine"
        code = _SHRINK_CODES[shrink]
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        w = torch.empty(b, g.num_queries, n, device=x.device, dtype=x.dtype)
        probs = (torch.empty(b, g.num_queries, n, device=x.device, dtype=x.dtype) if memae
                 else x.new_empty(0))
        stats = torch.empty(b, g.num_queries, 2, device=x.device, dtype=torch.float32)
        norms = _item_norms(memory)
        # Half types: native tensor-core dots (the flag only concerns float32 operands).
        tf32 = _allow_tf32(x.dtype) or x.dtype != torch.float32
        elt = x.element_size()
        n_pad = max(16, _next_pow2(n))
        p_arg = probs if memae else w
        if _use_fused(rows, n_pad, x.device):
            wrap_triton(_fwd_fused_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
                x, memory, norms, y, w, p_arg, stats,
                rows, n, d, *_geo_args(g), *_nchw_strides(x, g), *_nchw_strides(y, g),
                memory.stride(0), memory.stride(1), float(threshold), float(temperature),
                COSINE=cosine, SHRINK=code, STORE_P=memae, TF32=tf32,
                N_PAD=n_pad, ELT=elt)
            return y, w, probs, stats, norms
        splits, split_d = _split_d(rows, n, d, x.device)
        ws = torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
        sq = torch.empty(splits, rows, device=x.device, dtype=torch.float32)
        wrap_triton(_products_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),
                                                    triton.cdiv(n, meta["BLOCK_N"]), splits)](
            x, memory, ws, sq, rows, n, d, *_geo_args(g), split_d, *_nchw_strides(x, g),
            memory.stride(0), memory.stride(1),
            STORE_SQ=True, TF32=tf32, ELT=elt)
        block_r, block_n = _row_tile(n)
        wrap_triton(_rows_forward_kernel)[(_cdiv(rows, block_r),)](
            ws, sq, norms, w, p_arg, stats, rows, n, splits, float(threshold), float(temperature),
            COSINE=cosine, SHRINK=code, STORE_P=memae, BLOCK_R=block_r, BLOCK_N=block_n)
        wrap_triton(_rows_times_memory_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),
                                                             triton.cdiv(d, meta["BLOCK_D"]))](
            w, memory, x, stats, y, rows, n, d, *_geo_args(g), *_nchw_strides(x, g),
            *_nchw_strides(y, g), memory.stride(0), memory.stride(1),
            CORRECT=False, F32_DOT=False, TF32=tf32, ELT=elt)
        return y, w, probs, stats, norms

    @triton_op(BACKWARD, mutates_args=())
    def block_memory_backward_triton(
            grad_y: Optional[torch.Tensor], grad_w: Optional[torch.Tensor], x: torch.Tensor,
            memory: torch.Tensor, w: torch.Tensor, probs: torch.Tensor, row_stats: torch.Tensor,
            item_norms: torch.Tensor, rh: int, rw: int, rc: int, similarity: str, shrink: str,
            threshold: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        g, b, n, d, rows = _problem(x, memory, rh, rw, rc)
        memae = shrink == "memae"
        cosine = similarity == "cosine"
        code = _SHRINK_CODES[shrink]
        has_gy, has_gw = grad_y is not None, grad_w is not None
        grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        grad_m = torch.empty(n, d, device=x.device, dtype=memory.dtype)
        gy = grad_y if has_gy else x  # a placeholder pointer when absent
        gw = grad_w.contiguous() if has_gw else w
        w = w.contiguous()
        p_arg = probs.contiguous() if memae else w
        stats = row_stats.contiguous()
        tf32 = _allow_tf32(x.dtype) or x.dtype != torch.float32
        # Products with A (float32 operands): full float32 for float32 inputs unless TF32 is
        # allowed; TF32 for half inputs (whose own precision is lower still).
        a_tf32 = tf32
        elt = x.element_size()
        n_pad = max(16, _next_pow2(n))
        a = torch.empty(rows, n, device=x.device, dtype=torch.float32)
        if _use_fused(rows, n_pad, x.device):
            num_parts = _cdiv(rows, PART_ROWS)
            colpart = torch.empty(num_parts, n, device=x.device, dtype=torch.float32)
            wrap_triton(_bwd_fused_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
                gy, gw, x, memory, w, p_arg, stats, item_norms, a, colpart, grad_x,
                rows, n, d, *_geo_args(g), *_nchw_strides(gy, g), *_nchw_strides(x, g),
                *_nchw_strides(grad_x, g), memory.stride(0), memory.stride(1),
                float(threshold), float(temperature), num_parts,
                HAS_GY=has_gy, HAS_GW=has_gw, COSINE=cosine, SHRINK=code,
                TF32=tf32, A_TF32=a_tf32, N_PAD=n_pad, ELT=elt,
                F32_DOT=True, PART_ROWS=PART_ROWS)
        else:
            block_r, block_n = _row_tile(n)
            num_parts = _cdiv(rows, block_r)
            colpart = torch.empty(num_parts, n, device=x.device, dtype=torch.float32)
            corr = torch.empty(rows, device=x.device, dtype=torch.float32)
            if has_gy:
                splits, split_d = _split_d(rows, n, d, x.device)
                ws = torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
                wrap_triton(_products_kernel)[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),
                                                            triton.cdiv(n, meta["BLOCK_N"]),
                                                            splits)](
                    gy, memory, ws, corr, rows, n, d, *_geo_args(g), split_d,
                    *_nchw_strides(gy, g), memory.stride(0), memory.stride(1),
                    STORE_SQ=False, TF32=tf32, ELT=elt)
            else:
                splits = 1
                ws = torch.empty(1, rows, n, device=x.device, dtype=torch.float32)
            wrap_triton(_rows_backward_kernel)[(num_parts,)](
                ws, gw, w, p_arg, stats, item_norms, a, colpart, corr, rows, n, splits,
                float(threshold), float(temperature),
                HAS_GY=has_gy, HAS_GW=has_gw, COSINE=cosine, SHRINK=code,
                BLOCK_R=block_r, BLOCK_N=block_n)
            wrap_triton(_rows_times_memory_kernel)[lambda meta: (
                triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]))](
                a, memory, x, corr, grad_x, rows, n, d, *_geo_args(g), *_nchw_strides(x, g),
                *_nchw_strides(grad_x, g), memory.stride(0), memory.stride(1),
                CORRECT=cosine, F32_DOT=True, TF32=a_tf32, ELT=elt)
        wrap_triton(_grad_memory_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),
                                                       triton.cdiv(d, meta["BLOCK_D"]))](
            w, a, gy, x, memory, item_norms, colpart, grad_m,
            rows, n, d, *_geo_args(g), num_parts, *_nchw_strides(gy, g), *_nchw_strides(x, g),
            memory.stride(0), memory.stride(1),
            HAS_GY=has_gy, COSINE=cosine, TF32=tf32, A_TF32=a_tf32,
            ELT=elt)
        return grad_x, grad_m

    ops.register_fused_op(FORWARD, BACKWARD, torch.ops.daad_ext.block_memory_backward_triton)


def block_memory_triton(x: torch.Tensor, memory: torch.Tensor, geometry: Division,
                        similarity: str, shrink: str, lam: float,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton op on checked arguments; returns ``(y, w)``."""
    y, w, *_ = torch.ops.daad_ext.block_memory_forward_triton(
        x, memory, geometry.rh, geometry.rw, geometry.rc, similarity, shrink, lam, temperature)
    return y, w
