"""The operator's parameters and the checks every backend runs before it computes anything.

One place for argument validation, so the reference, the C++ op, the Triton op and the layer
reject the same inputs with the same messages.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

SIMILARITIES = ("cosine", "dot")
SHRINKS = ("hard", "memae", "none")
#: The integer codes the kernels receive; the C++ enums (csrc/block_memory.h) use the same values
#: and the extension exports its table, which a test compares with these.
SIMILARITY_CODES = {name: code for code, name in enumerate(SIMILARITIES)}
SHRINK_CODES = {name: code for code, name in enumerate(SHRINKS)}

#: Floor of the norms in the cosine similarity (as ``torch.nn.functional.normalize``).
NORM_EPS = 1e-12
#: Floor of ``|p - lam|`` and of the row sum in MemAE's hard shrinkage.
MEMAE_EPS = 1e-12


class Division(NamedTuple):
    """Division rates and the block geometry they imply for one (C, H, W) feature map."""

    rh: int
    rw: int
    rc: int
    bc: int
    bh: int
    bw: int

    @property
    def num_queries(self) -> int:
        return self.rh * self.rw * self.rc

    @property
    def block_dim(self) -> int:
        return self.bc * self.bh * self.bw


def parse_division(division: Sequence[int]) -> tuple[int, int, int]:
    if len(division) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) for r in division):
        raise ValueError(f"division must be three integers (rh, rw, rc), got {tuple(division)!r}")
    rh, rw, rc = division
    if min(rh, rw, rc) < 1:
        raise ValueError(f"division rates must be >= 1, got (rh, rw, rc) = {tuple(division)}")
    return rh, rw, rc


def make_division(channels: int, height: int, width: int, division: Sequence[int]) -> Division:
    """Checks that (C, H, W) divides evenly by (rh, rw, rc) and returns the block geometry."""
    rh, rw, rc = parse_division(division)
    bad = [f"{name}={size} is not divisible by {rname}={rate}"
           for name, size, rname, rate in (("H", height, "rh", rh), ("W", width, "rw", rw),
                                           ("C", channels, "rc", rc))
           if size % rate]
    if bad:
        raise ValueError("feature map cannot be divided evenly into blocks: " + "; ".join(bad))
    return Division(rh, rw, rc, channels // rc, height // rh, width // rw)


def check_options(similarity: str, shrink: str, threshold: Optional[float], temperature: float,
                  num_items: int) -> float:
    """Validates the addressing options and returns the resolved threshold (``1/N`` by default)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
    if shrink not in SHRINKS:
        raise ValueError(f"unknown shrink {shrink!r}; choose one of {SHRINKS}")
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if threshold is None:
        return 1.0 / num_items
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)


def check_temperature(temperature: float, dtype: torch.dtype) -> None:
    """Refuses a temperature that underflows the precision the kernels divide by it in.

    Half types compute their statistics in float32, so float32's range is what matters for them.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if temperature < torch.finfo(compute).tiny:
        raise ValueError(f"temperature {temperature!r} underflows {compute} (smallest normal "
                         f"{torch.finfo(compute).tiny:.3g}), the precision {dtype} inputs are "
                         f"computed in; use a larger temperature")


def check_inputs(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int]) -> Division:
    """Checks the tensors' ranks, shapes, dtypes and devices; returns the block geometry."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor (B, C, H, W), got shape {shape}")
    if not isinstance(memory, torch.Tensor) or memory.dim() != 2:
        shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(f"memory must be a 2-D tensor (N, D), got shape {shape}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if not memory.dtype.is_floating_point:
        raise TypeError(f"memory must be a floating-point tensor, got dtype {memory.dtype}")
    if x.dtype != memory.dtype:
        raise TypeError(f"x and memory must have the same dtype, got {x.dtype} and {memory.dtype}")
    if x.device != memory.device:
        raise ValueError(f"x and memory must be on the same device, got {x.device} and {memory.device}")
    _, c, h, w = x.shape
    if min(c, h, w) < 1:
        raise ValueError(f"x must have C, H, W >= 1, got shape {tuple(x.shape)}")
    geometry = make_division(c, h, w, division)
    n, d = memory.shape
    if n < 1:
        raise ValueError("memory must hold at least one item (N >= 1)")
    if d != geometry.block_dim:
        raise ValueError(
            f"memory has item length D={d}, but division {tuple(division)} of a (C, H, W) = "
            f"{(c, h, w)} map gives blocks of D = {geometry.bc}*{geometry.bh}*{geometry.bw} = "
            f"{geometry.block_dim}")
    return geometry
