"""Autotuning configurations, the filter that prunes them, and the choice of path and D splits.

Every kernel with a tile choice is autotuned keyed on (N, D); its configurations are pruned to
those whose pipelined tiles fit the GPU's shared memory (and, for the fused kernels, whose float32
BLOCK_R x N_PAD tile fits the registers). The filter and the autotuner depend on a
:class:`~daad_ext.triton.config.TritonConfig`, so :func:`autotuned` builds one autotuner per
(kernel, family, config) and caches it.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import triton

from .config import INTERPRETED, MAX_FUSED_N, SPLIT_ALIGN, PART_ROWS, TritonConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _configs(block_names: tuple[str, ...], rows) -> tuple[triton.Config, ...]:
    """triton.Configs from (block sizes..., num_warps, num_stages) rows, in preference order."""
    return tuple(triton.Config(dict(zip(block_names, row[:-2])), num_warps=row[-2],
                               num_stages=row[-1]) for row in rows)


def smem_limit(config: TritonConfig) -> int:
    """Shared memory per block: the config's, else the current GPU's."""
    if config.smem_limit is not None:
        return config.smem_limit
    if INTERPRETED or not torch.cuda.is_available():
        return 1 << 30
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)


def _interpreter_pick(configs, config: TritonConfig):
    pick = max if config.interpreter_tiles == "large" else min
    return [pick(configs, key=lambda c: tuple(c.kwargs.values()))]


def _finish(configs, keep, config: TritonConfig):
    """Drops the interpreter's all-16 tiles on a GPU unless nothing else fits; without
    autotuning keeps the first (preferred) survivor."""
    big = [c for c in keep if any(v > 16 for v in c.kwargs.values())]
    keep = big or keep or [min(configs, key=lambda c: tuple(c.kwargs.values()))]
    return keep if config.autotune else keep[:1]


def fused_filter(configs, named_args, config: TritonConfig, **kwargs):
    """Fused kernels: the M tile (N_PAD x BLOCK_D) and the query tile per pipeline stage, of
    ``ELT`` bytes an element (a constexpr the kernels take for this filter only), must fit shared
    memory, and the float32 (BLOCK_R x N_PAD) tile at most 64 registers a thread."""
    if INTERPRETED:
        return _interpreter_pick(configs, config)
    args = {**named_args, **kwargs}
    n_pad, elt = int(args["N_PAD"]), int(args["ELT"])
    limit, keep = smem_limit(config), []
    for c in configs:
        br, bd = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_D"]
        smem = c.num_stages * (br + n_pad) * bd * elt
        regs = br * n_pad // (32 * c.num_warps)
        if smem <= limit and regs <= 64:
            keep.append(c)
    return _finish(configs, keep, config)


def tile_filter(configs, named_args, config: TritonConfig, **kwargs):
    """Tiled kernels: both operand tiles per pipeline stage must fit shared memory (float32
    counted, as some products run on float32 operands)."""
    if INTERPRETED:
        return _interpreter_pick(configs, config)
    limit, keep = smem_limit(config), []
    for c in configs:
        k = c.kwargs
        if "BLOCK_K" in k:  # (rows or items) x BLOCK_K times BLOCK_K x BLOCK_D
            tiles = (k.get("BLOCK_R", 0) + k.get("BLOCK_N", 0) + k["BLOCK_D"]) * k["BLOCK_K"]
            if "BLOCK_N" in k:  # the memory gradient: two products per step
                tiles *= 2
        else:  # BLOCK_R x BLOCK_D times BLOCK_D x BLOCK_N
            tiles = (k["BLOCK_R"] + k["BLOCK_N"]) * k["BLOCK_D"]
        if c.num_stages * tiles * 4 <= limit:
            keep.append(c)
    return _finish(configs, keep, config)


class Family(NamedTuple):
    """The configurations a kernel is tuned over and the filter that prunes them."""

    configs: tuple[triton.Config, ...]
    prune: Callable


# A few configurations each: every one that fits is compiled once per kernel variant, and compile
# time adds up (the last, all-16 one is the interpreter's).
FUSED = Family(_configs(("BLOCK_R", "BLOCK_D"), [
    (16, 32, 4, 2), (32, 32, 4, 2), (16, 64, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2),
    (16, 16, 4, 2)]), fused_filter)
PRODUCTS = Family(_configs(("BLOCK_R", "BLOCK_N", "BLOCK_D"), [
    (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 8, 3), (16, 16, 16, 4, 2)]),
    tile_filter)
ROWS_TIMES_MEMORY = Family(_configs(("BLOCK_R", "BLOCK_D", "BLOCK_K"), [
    (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (16, 16, 16, 4, 2)]),
    tile_filter)
GRAD_MEMORY = Family(_configs(("BLOCK_N", "BLOCK_D", "BLOCK_K"), [
    (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3), (16, 16, 16, 4, 2)]),
    tile_filter)


@functools.lru_cache(maxsize=None)
def autotuned(kernel: triton.JITFunction, family: Family,
              config: TritonConfig) -> triton.runtime.Autotuner:
    """``kernel`` autotuned over ``family`` keyed on (N, D), pruned under ``config``."""
    prune = functools.partial(family.prune, config=config)
    return triton.autotune(configs=list(family.configs), key=["N", "D"],
                           prune_configs_by={"early_config_prune": prune})(kernel)


def allow_tf32(dtype: torch.dtype) -> bool:
    """Whether float32 products may use TF32 (PyTorch's matmul precision setting)."""
    return dtype == torch.float32 and (torch.backends.cuda.matmul.allow_tf32
                                       or torch.get_float32_matmul_precision() != "highest")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_fused(rows: int, n_pad: int, device: torch.device, config: TritonConfig) -> bool:
    """The fused path for N_PAD <= MAX_FUSED_N when forced, or when its programs fill the GPU."""
    if n_pad > MAX_FUSED_N or config.path == "tiled":
        return False
    if config.path == "fused":
        return True
    # A fused program owns >= 16 rows and all of D: it pays off once those programs fill the GPU
    # (few queries on a large GPU, DAAD's B*Q = 512 on 132 SMs, take the tiled path).
    return cdiv(rows, 16) >= _num_sms(device)


def split_d(rows: int, n: int, d: int, device: torch.device,
            config: TritonConfig) -> tuple[int, int]:
    """(splits, columns per split) of the tiled path's products: enough to fill the GPU."""
    most = cdiv(d, SPLIT_ALIGN)
    if config.splits is not None:
        splits = max(1, min(config.splits, most))
    elif device.type != "cuda":
        splits = min(2, most)
    else:
        tiles = cdiv(rows, 64) * cdiv(n, 64)
        splits = max(1, min(cdiv(2 * _num_sms(device), tiles), most))
    columns = cdiv(cdiv(d, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return cdiv(d, columns), columns


def row_tile(n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the tiled path's row-epilogue kernels."""
    return PART_ROWS, min(max(16, next_pow2(n)), 256)
