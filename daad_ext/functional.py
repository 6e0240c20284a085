"""``block_memory``: dispatches to a backend, checking the arguments once (before it, or, for a
backend whose op checks the whole call itself, in the op).

Backends, each with ``supports(device, dtype)`` and a function on checked arguments:

* ``"reference"``: eager PyTorch (:mod:`daad_ext.reference`), always available;
* ``"cpu"`` / ``"cuda"``: the fused C++ op (:mod:`daad_ext.ops`) on CPU / CUDA tensors;
* ``"triton"``: the fused Triton kernels (:mod:`daad_ext.triton`) on CUDA tensors (and on CPU
  float32 tensors under Triton's interpreter, ``TRITON_INTERPRET=1``, for tests); unavailable
  when Triton is not installed.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from . import ops
from . import triton as triton_backend
from .autocast import autocast_inputs
from .reference import block_memory_ref_checked
from .spec import check_call


class Backend(NamedTuple):
    """Where a backend runs, and how: ``run`` takes checked arguments (the block geometry and the
    resolved threshold, as ``BlockMemory`` holds them); ``call``, where the backend's op checks
    the whole call itself, takes ``block_memory``'s own arguments, which are then checked once,
    by the op, instead of twice."""

    supports: Callable[[torch.device, torch.dtype], bool]
    run: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    call: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None


BACKENDS: dict[str, Backend] = {
    "reference": Backend(lambda device, dtype: True, block_memory_ref_checked),
    # The C++ op checks in C++ too, but raises RuntimeError: block_memory checks first, for the
    # spec's ValueError / TypeError.
    "cpu": Backend(lambda device, dtype: device.type == "cpu" and ops.supports(device, dtype),
                   ops.block_memory_fused),
    "cuda": Backend(lambda device, dtype: device.type == "cuda" and ops.supports(device, dtype),
                    ops.block_memory_fused),
    "triton": Backend(triton_backend.supports, triton_backend.block_memory_triton,
                      triton_backend.call_triton),
}
#: ``backend="auto"`` takes the first available of these. On CPU the fused kernel is the faster
#: (benchmarks/memory_op.py, README's table); the CUDA order, the CUDA kernel before Triton, is
#: the intended one, not yet measured: neither GPU backend has run on a GPU.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def available_backends(device: Union[str, torch.device] = "cpu",
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that can run on ``device`` with ``dtype``, in ``AUTO_ORDER``."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ()) + tuple(BACKENDS)
    return [name for name in dict.fromkeys(order) if BACKENDS[name].supports(device, dtype)]


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {tuple(BACKENDS)}")


def _available_choice(backend: str, x: torch.Tensor, memory: torch.Tensor) -> Optional[str]:
    """The backend that will run, where it can take tensors ``x`` and ``memory`` as they are;
    None where the checks must speak first (no tensors, an unknown or unavailable backend)."""
    if not (isinstance(x, torch.Tensor) and isinstance(memory, torch.Tensor)):
        return None
    available = available_backends(x.device, x.dtype)
    name = available[0] if backend == "auto" else backend
    return name if name in available else None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: ``backend`` itself, or the fastest available for "auto"."""
    check_backend_name(backend)
    available = available_backends(device, dtype)
    if backend == "auto":
        return available[0]
    if backend not in available:
        raise ValueError(f"backend {backend!r} is not available for {dtype} tensors on {device}; "
                         f"available: {available}")
    return backend


def in_layout_of(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A backend's ``(y, w)`` with y in the memory format of ``x``: channels_last in, channels_last
    out, as PyTorch's convolutions do (the backends write y in NCHW). A channels_last network then
    concatenates y and convolves it without reordering (README, "The detector")."""
    y, w = out
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y, w


def block_memory(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int],
                 similarity: str = "cosine", shrink: str = "hard", threshold: Optional[float] = None,
                 temperature: float = 1.0,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise memory read of ``x`` (B, C, H, W) from ``memory`` (N, D).

    Returns ``(y, w)``: ``y`` has the shape of ``x`` (and its memory format: channels_last when
    ``x`` is), ``w`` (B, Q, N) holds the addressing weights.
    The operator is specified in :mod:`daad_ext.reference`. Gradients are computed only for the
    inputs that require them (a frozen memory costs no grad-memory work).

    Size limits of the fused kernels' index arithmetic, checked before anything is allocated
    (beyond them the op raises a RuntimeError naming the limit): ``"cpu"`` addresses everything in
    64-bit (any B, C*H*W, D, B*Q*N, and strides, that memory holds) but counts items in 32-bit,
    N < 2^31; ``"cuda"`` computes 64-bit offsets with 32-bit indices, B*Q < 2^30 and
    N, D <= 65535 * 128 = 8,388,480. The reference has no limit of its own.

    Example:
        >>> import torch
        >>> from daad_ext import block_memory
        >>> x, memory = torch.randn(2, 8, 16, 16), torch.randn(50, 8 * 4 * 4)
        >>> y, w = block_memory(x, memory, (4, 4, 1))
        >>> y.shape, w.shape
        (torch.Size([2, 8, 16, 16]), torch.Size([2, 16, 50]))
    """
    cast = autocast_inputs(x, memory, backend, available_backends)
    if cast is not None:  # under torch.autocast: see daad_ext/autocast.py
        with torch.autocast(x.device.type, enabled=False):
            return block_memory(*cast, division, similarity, shrink, threshold, temperature, backend)
    name = _available_choice(backend, x, memory)
    if name is not None and BACKENDS[name].call is not None:  # its op checks the call
        return in_layout_of(x, BACKENDS[name].call(x, memory, division, similarity, shrink, threshold, temperature))
    geometry, threshold = check_call(x, memory, division, similarity, shrink, threshold, temperature)
    name = name or resolve_backend(backend, x.device, x.dtype)
    return in_layout_of(x, BACKENDS[name].run(x, memory, geometry, similarity, shrink, threshold, float(temperature)))
