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

Every launch passes the kernel's arguments by keyword, under the names the kernel gives them
(their convention: daad_ext/triton/jit.py); :func:`_sizes`, :func:`_nchw` and :func:`_memory`
spell out the groups of sizes and strides.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
from torch.library import wrap_triton

from ..spec import SHRINK_CODES, Division
from . import checks, fused, items, tiled, tuning
from .config import DEFAULT, PART_ROWS, TritonConfig

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# The kernels' scalar arguments, by the names the kernels give them (daad_ext/triton/jit.py's
# docstring lists the convention); each launch below passes every argument by keyword.
def _sizes(rows: int, n: int, d: int, g: Division) -> dict[str, int]:
    """R (query rows), N, D and the block geometry: Q, RW, RHW = rh*rw, BW, BHW = bh*bw."""
    return dict(R=rows, N=n, D=d, Q=g.num_queries, RW=g.rw, RHW=g.rh * g.rw, BW=g.bw,
                BHW=g.bh * g.bw)


def _nchw(name: str, t: torch.Tensor, g: Division) -> dict[str, int]:
    """The strides of the (B, C, H, W) operand ``name`` ("x", "y", "g" for grad_y, "o" for the
    output grad_x): s{name}b per image; s{name}bc, s{name}bh, s{name}bw from one block to the
    next; s{name}c, s{name}h, s{name}w inside a block."""
    sb, sc, sh, sw = (int(st) for st in t.stride())
    return {f"s{name}b": sb, f"s{name}bc": g.bc * sc, f"s{name}bh": g.bh * sh,
            f"s{name}bw": g.bw * sw, f"s{name}c": sc, f"s{name}h": sh, f"s{name}w": sw}


def _memory(memory: torch.Tensor) -> dict[str, int]:
    """The memory's strides: smn per item, smd per column."""
    return dict(smn=int(memory.stride(0)), smd=int(memory.stride(1)))


def _item_norms(memory: torch.Tensor) -> torch.Tensor:
    n, d = int(memory.shape[0]), int(memory.shape[1])
    out = torch.empty(n, device=memory.device, dtype=torch.float32)
    wrap_triton(items.item_norms_kernel)[(tuning.cdiv(n, 64),)](
        m_ptr=memory, out_ptr=out, N=n, D=d, **_memory(memory), BLOCK_N=64, BLOCK_D=64)
    return out


def _tuned(kernel, family: tuning.Family, config: TritonConfig):
    return wrap_triton(tuning.autotuned(kernel, family, config))


def _grid(*axes: Union[tuple[int, str], int]):
    """The launch grid of an autotuned kernel: per axis, one program per tile of a
    ``(size, tile-size name)`` as the autotuner picks the tile, or a fixed count."""
    return lambda meta: tuple(axis if isinstance(axis, int) else triton.cdiv(axis[0], meta[axis[1]])
                              for axis in axes)


def forward(x: torch.Tensor, memory: torch.Tensor, rh: int, rw: int, rc: int, similarity: str,
            shrink: str, threshold: float, temperature: float,
            config: TritonConfig = DEFAULT) -> Outputs:
    """(y, w, probs, row_stats, item_norms), as ``daad_ext::block_memory_forward_triton``."""
    g = checks.check_forward(x, memory, rh, rw, rc, similarity, shrink, threshold, temperature)
    b, n, d = int(x.shape[0]), int(memory.shape[0]), int(memory.shape[1])
    rows = b * g.num_queries
    memae = shrink == "memae"
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    w = torch.empty(b, g.num_queries, n, device=x.device, dtype=x.dtype)
    probs = torch.empty_like(w) if memae else x.new_empty(0)
    stats = torch.empty(b, g.num_queries, 2, device=x.device, dtype=torch.float32)
    norms = _item_norms(memory)
    sizes = _sizes(rows, n, d, g)
    epilogue = dict(threshold=float(threshold), temperature=float(temperature),
                    COSINE=similarity == "cosine", SHRINK=SHRINK_CODES[shrink], STORE_P=memae)
    # Half types: native tensor-core dots (the flag only concerns float32 operands).
    tf32 = tuning.allow_tf32(x.dtype) or x.dtype != torch.float32
    n_pad = max(16, tuning.next_pow2(n))
    p_arg = probs if memae else w  # (p_ptr is never written through without STORE_P)
    if tuning.use_fused(rows, n_pad, x.device, config):
        _tuned(fused.forward_kernel, tuning.FUSED, config)[_grid((rows, "BLOCK_R"))](
            x_ptr=x, m_ptr=memory, mnorm_ptr=norms, y_ptr=y, w_ptr=w, p_ptr=p_arg,
            stats_ptr=stats, **sizes, **_nchw("x", x, g), **_nchw("y", y, g), **_memory(memory),
            **epilogue, TF32=tf32, N_PAD=n_pad, ELT=x.element_size())
        return y, w, probs, stats, norms
    splits, split_d = tuning.split_d(rows, n, d, x.device, config)
    ws = torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
    sq = torch.empty(splits, rows, device=x.device, dtype=torch.float32)
    _tuned(tiled.products_kernel, tuning.PRODUCTS, config)[
        _grid((rows, "BLOCK_R"), (n, "BLOCK_N"), splits)](
        x_ptr=x, m_ptr=memory, ws_ptr=ws, sq_ptr=sq, **sizes, SPLIT_D=split_d,
        **_nchw("x", x, g), **_memory(memory), STORE_SQ=True, TF32=tf32)
    block_r, block_n = tuning.row_tile(n)
    wrap_triton(tiled.rows_forward_kernel)[(tuning.cdiv(rows, block_r),)](
        ws_ptr=ws, sq_ptr=sq, mnorm_ptr=norms, w_ptr=w, p_ptr=p_arg, stats_ptr=stats, R=rows,
        N=n, SPLITS=splits, **epilogue, BLOCK_R=block_r, BLOCK_N=block_n)
    _tuned(tiled.rows_times_memory_kernel, tuning.ROWS_TIMES_MEMORY, config)[
        _grid((rows, "BLOCK_R"), (d, "BLOCK_D"))](
        a_ptr=w, m_ptr=memory, x_ptr=x, corr_ptr=stats, out_ptr=y, **sizes, **_nchw("x", x, g),
        **_nchw("o", y, g), **_memory(memory), CORRECT=False, F32_DOT=False, TF32=tf32)
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
    memae, cosine, has_gy = shrink == "memae", similarity == "cosine", grad_y is not None
    grad_x = (torch.empty(x.shape, device=x.device, dtype=x.dtype) if needs_grad_x
              else x.new_empty(0))
    grad_m = (torch.empty(n, d, device=x.device, dtype=memory.dtype) if needs_grad_memory
              else x.new_empty(0))
    if not (needs_grad_x or needs_grad_memory):
        return grad_x, grad_m
    # Placeholder pointers where a tensor is absent (never read or written through).
    gy = grad_y if has_gy else x
    gx = grad_x if needs_grad_x else x
    w = w.contiguous()
    gw = grad_w.contiguous() if grad_w is not None else w
    p_arg = probs.contiguous() if memae else w
    stats = row_stats.contiguous()
    sizes = _sizes(rows, n, d, g)
    epilogue = dict(threshold=float(threshold), temperature=float(temperature), HAS_GY=has_gy,
                    HAS_GW=grad_w is not None, COSINE=cosine, SHRINK=SHRINK_CODES[shrink],
                    NEED_GX=needs_grad_x, NEED_GM=needs_grad_memory)
    # Float32 inputs take TF32 products when PyTorch allows them, full float32 otherwise; half
    # inputs take their tensor-core dots, and TF32 for the products with the float32 A (their
    # own precision is lower still).
    tf32 = tuning.allow_tf32(x.dtype) or x.dtype != torch.float32
    n_pad = max(16, tuning.next_pow2(n))
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
        _tuned(fused.backward_kernel, tuning.FUSED, config)[_grid((rows, "BLOCK_R"))](
            gy_ptr=gy, gw_ptr=gw, x_ptr=x, m_ptr=memory, w_ptr=w, p_ptr=p_arg, stats_ptr=stats,
            mnorm_ptr=item_norms, a_ptr=a, colpart_ptr=colpart, gx_ptr=gx, **sizes,
            **_nchw("g", gy, g), **_nchw("x", x, g), **_nchw("o", gx, g), **_memory(memory),
            NUM_PARTS=num_parts, **epilogue, TF32=tf32, N_PAD=n_pad,
            ELT=4, PART_ROWS=PART_ROWS)  # ELT: the products with A run on float32 tiles
    else:
        corr = workspace(rows, needed=needs_grad_x and cosine)
        splits, split_d = tuning.split_d(rows, n, d, x.device, config) if has_gy else (1, d)
        ws = workspace(splits, rows, n)
        if has_gy:
            _tuned(tiled.products_kernel, tuning.PRODUCTS, config)[
                _grid((rows, "BLOCK_R"), (n, "BLOCK_N"), splits)](
                x_ptr=gy, m_ptr=memory, ws_ptr=ws, sq_ptr=corr, **sizes, SPLIT_D=split_d,
                **_nchw("x", gy, g), **_memory(memory), STORE_SQ=False, TF32=tf32)
        wrap_triton(tiled.rows_backward_kernel)[(num_parts,)](
            ws_ptr=ws, gw_ptr=gw, w_ptr=w, p_ptr=p_arg, stats_ptr=stats, mnorm_ptr=item_norms,
            a_ptr=a, colpart_ptr=colpart, corr_ptr=corr, R=rows, N=n, SPLITS=splits, **epilogue,
            BLOCK_R=block_r, BLOCK_N=block_n)
        if needs_grad_x:
            _tuned(tiled.rows_times_memory_kernel, tuning.ROWS_TIMES_MEMORY, config)[
                _grid((rows, "BLOCK_R"), (d, "BLOCK_D"))](
                a_ptr=a, m_ptr=memory, x_ptr=x, corr_ptr=corr, out_ptr=grad_x, **sizes,
                **_nchw("x", x, g), **_nchw("o", grad_x, g), **_memory(memory),
                CORRECT=cosine, F32_DOT=True, TF32=tf32)
    if needs_grad_memory:
        _tuned(items.grad_memory_kernel, tuning.GRAD_MEMORY, config)[
            _grid((n, "BLOCK_N"), (d, "BLOCK_D"))](
            w_ptr=w, a_ptr=a, gy_ptr=gy, x_ptr=x, m_ptr=memory, mnorm_ptr=item_norms,
            colpart_ptr=colpart, gm_ptr=grad_m, **sizes, NUM_PARTS=num_parts,
            **_nchw("g", gy, g), **_nchw("x", x, g), **_memory(memory), HAS_GY=has_gy,
            COSINE=cosine, TF32=tf32)
    return grad_x, grad_m
