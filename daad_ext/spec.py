"""The operator's parameters and the checks every backend runs before it computes anything.

One place for argument validation, so the reference, the C++ op, the Triton op and the layer
reject the same inputs with the same messages.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

SIMILARITIES = ("cosine", "dot")
SHRINKS = ("hard", "memae", "none")
#: The integer codes the kernels receive; the C++ enums (csrc/block_memory.h) use the same values
#: and the extension exports its table, which a test compares with these.
SIMILARITY_CODES = {name: code for code, name in enumerate(SIMILARITIES)}
SHRINK_CODES = {name: code for code, name in enumerate(SHRINKS)}

#: Floor of the norms in the cosine similarity (as ``torch.nn.functional.normalize``); no gradient
#: flows through the similarity to a query or memory item whose norm is below it.
NORM_EPS = 1e-12
#: Floor of ``|p - threshold|`` and of the row sum in MemAE's hard shrinkage.
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


def require(condition, error: type[Exception], message: Callable[[], str]) -> None:
    """Raises ``error(message())`` unless ``condition`` holds.

    ``condition`` may be symbolic (a condition on the sizes of fake tensors while ``torch.compile``
    or ``torch.export`` traces the op's fake kernel): then ``torch._check_with`` records it as a
    runtime assertion instead of specialising the graph to the sizes at hand, and still raises
    ``error`` with the same message when the sizes at hand violate it.
    """
    if isinstance(condition, torch.SymBool):
        torch._check_with(error, condition, message)
    elif not condition:
        raise error(message())


def _type_name(value) -> str:
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def parse_division(division: Sequence[int]) -> tuple[int, int, int]:
    """(rh, rw, rc) from three Python or NumPy integers (a sequence or a 1-D NumPy array)."""
    if isinstance(division, np.ndarray) and division.ndim == 1:
        division = tuple(division)  # NumPy integers, checked as any others below
    if (not isinstance(division, Sequence) or isinstance(division, str) or len(division) != 3
            or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool)
                       for r in division)):
        shown = tuple(division) if isinstance(division, Sequence) else division
        raise ValueError(f"division must be three integers (rh, rw, rc), got {shown!r}")
    rh, rw, rc = (int(r) for r in division)
    if min(rh, rw, rc) < 1:
        raise ValueError(f"division rates must be >= 1, got (rh, rw, rc) = {(rh, rw, rc)}")
    return rh, rw, rc


def make_division(channels: int, height: int, width: int, division: Sequence[int]) -> Division:
    """Checks that (C, H, W) divides evenly by (rh, rw, rc) and returns the block geometry."""
    rh, rw, rc = parse_division(division)
    sizes = (("H", height, "rh", rh), ("W", width, "rw", rw), ("C", channels, "rc", rc))

    def message() -> str:
        bad = [f"{name}={size} is not divisible by {rname}={rate}"
               for name, size, rname, rate in sizes if size % rate]
        return "feature map cannot be divided evenly into blocks: " + "; ".join(bad)

    for _, size, _, rate in sizes:
        require(size % rate == 0, ValueError, message)
    return Division(rh, rw, rc, channels // rc, height // rh, width // rw)


def check_feature_map(channels: int, height: int, width: int) -> None:
    """The (C, H, W) a layer is built for: positive integers."""
    for name, size in (("channels", channels), ("height", height), ("width", width)):
        if not _is_int(size) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {size!r}")


def _check_number(name: str, value) -> float:
    """A Python or NumPy real number (not a bool, not a tensor) as a float."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor of shape "
                        f"{tuple(value.shape)}; pass float({name}) (or .item())")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)} {value!r}")
    return float(value)


def check_options(similarity: str, shrink: str, threshold: Optional[float], temperature: float,
                  num_items: int) -> float:
    """Validates the addressing options and returns the resolved threshold (``1/N`` by default).

    ``threshold`` and ``temperature`` may be Python or NumPy numbers; tensors are refused (their
    value would be read on the host at every call, a hidden synchronisation on a GPU).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
    if shrink not in SHRINKS:
        raise ValueError(f"unknown shrink {shrink!r}; choose one of {SHRINKS}")
    if not _is_int(num_items):
        raise TypeError(f"num_items must be an integer, got {_type_name(num_items)} {num_items!r}")
    require(num_items >= 1, ValueError, lambda: f"num_items must be >= 1, got {num_items}")
    value = _check_number("temperature", temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    if threshold is None:
        return 1.0 / num_items
    threshold = _check_number("threshold", threshold)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return threshold


def schema_arguments(memory: torch.Tensor, division: Sequence[int], threshold: Optional[float],
                     temperature: float) -> tuple[int, int, int, float, float]:
    """``block_memory``'s Python arguments as the ops' schema takes them: (rh, rw, rc, threshold,
    temperature), the threshold ``1/N`` by default. For an op that runs :func:`check_call` itself,
    which checks everything else (a memory without items gets the placeholder 1.0, which that
    check never reaches: it refuses the memory first)."""
    rh, rw, rc = parse_division(division)
    if threshold is None:
        items = int(memory.shape[0]) if memory.dim() == 2 else 0
        threshold = 1.0 / items if items >= 1 else 1.0
    return (rh, rw, rc, _check_number("threshold", threshold),
            _check_number("temperature", temperature))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the statistics of ``dtype`` inputs are computed in: float32 for the half types
    (and float32), float64 for float64. Also the dtype of the kernels' saved per-row and per-item
    statistics."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_temperature(temperature: float, dtype: torch.dtype) -> None:
    """Refuses a temperature that underflows the precision the kernels divide by it in.

    Half types compute their statistics in float32, so float32's range is what matters for them.
    The C++ kernels run the same check (csrc/op_checks.h), with the same message.
    """
    compute = compute_dtype(dtype)
    tiny = torch.finfo(compute).tiny
    if float(temperature) < tiny:
        raise ValueError(f"temperature {float(temperature)!r} underflows {_dtype_name(compute)} "
                         f"(smallest normal {tiny:.3g}), the precision {_dtype_name(dtype)} "
                         f"inputs are computed in; use a larger temperature")


def check_inputs(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int]) -> Division:
    """Checks the tensors' ranks, shapes, dtypes and devices; returns the block geometry.

    Also the check of the ops' fake kernels (daad_ext/ops.py), on fake tensors whose sizes may be
    symbolic: size conditions go through :func:`require`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else _type_name(x)
        raise ValueError(f"x must be a 4-D tensor (B, C, H, W), got shape {shape}")
    if not isinstance(memory, torch.Tensor) or memory.dim() != 2:
        shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else _type_name(memory)
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
    for size in (c, h, w):
        require(size >= 1, ValueError,
                lambda: f"x must have C, H, W >= 1, got shape {tuple(x.shape)}")
    geometry = make_division(c, h, w, division)
    n, d = memory.shape
    require(n >= 1, ValueError, lambda: "memory must hold at least one item (N >= 1)")
    require(d == geometry.block_dim, ValueError, lambda: (
        f"memory has item length D={d}, but division {tuple(division)} of a (C, H, W) = "
        f"{(c, h, w)} map gives blocks of D = {geometry.bc}*{geometry.bh}*{geometry.bw} = "
        f"{geometry.block_dim}"))
    return geometry


def check_call(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int], similarity: str,
               shrink: str, threshold: Optional[float], temperature: float) -> tuple[Division, float]:
    """Every check of one call of the operator (tensors, options, temperature for x's dtype);
    returns the block geometry and the resolved threshold."""
    geometry = check_inputs(x, memory, division)
    threshold = check_options(similarity, shrink, threshold, temperature, memory.shape[0])
    check_temperature(temperature, x.dtype)
    return geometry, threshold


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {_type_name(t)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} (x's device), got {t.device}")


def _check_saved(name: str, t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
                 x: torch.Tensor) -> None:
    """A saved tensor or gradient of the backward: x's device, ``shape`` and ``dtype``."""
    _check_device(name, t, x)
    shape = tuple(shape)

    def message() -> str:
        return f"{name} must have shape {shape}, got {tuple(t.shape)}"

    if t.dim() != len(shape):
        raise ValueError(message())
    for size, want in zip(t.shape, shape):
        require(size == want, ValueError, message)
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def check_backward_call(grad_y: Optional[torch.Tensor], grad_w: Optional[torch.Tensor],
                        x: torch.Tensor, memory: torch.Tensor, w: torch.Tensor,
                        probs: torch.Tensor, row_stats: torch.Tensor, item_norms: torch.Tensor,
                        division: Sequence[int], similarity: str, shrink: str,
                        threshold: Optional[float], temperature: float) -> tuple[Division, float]:
    """Every check of one call of the backward op: the forward's (:func:`check_call`), the saved
    tensors as the forward returned them (``probs`` is MemAE's only, else a placeholder: only its
    device counts) and the gradients that are given. Every tensor must be on x's device: a meta
    tensor among CPU ones would send the call to the fake kernel, which computes nothing."""
    geometry, threshold = check_call(x, memory, division, similarity, shrink, threshold, temperature)
    weights = (x.shape[0], geometry.num_queries, memory.shape[0])
    stats = compute_dtype(x.dtype)
    _check_saved("w", w, weights, x.dtype, x)
    if shrink == "memae":
        _check_saved("probs", probs, weights, x.dtype, x)
    else:
        _check_device("probs", probs, x)
    _check_saved("row_stats", row_stats, weights[:2] + (2,), stats, x)
    _check_saved("item_norms", item_norms, weights[2:], stats, x)
    if grad_y is not None:
        _check_saved("grad_y", grad_y, tuple(x.shape), x.dtype, x)
    if grad_w is not None:
        _check_saved("grad_w", grad_w, weights, x.dtype, x)
    return geometry, threshold
