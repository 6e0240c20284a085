"""Shared test helpers: tie-free inputs and the comparison of a backend with the reference.

The hard threshold (and MemAE's, which rises from 0 to p within 1e-12 of threshold) is discontinuous: two
correct implementations can keep different items when a weight is within rounding of threshold. Tests
therefore draw inputs whose float64 weights keep a relative ``margin`` from threshold (and, where the
row-maximum rule decides, between the two largest weights), instead of loosening tolerances.
MemAE's shrinkage u = (p - threshold) p / (p - threshold + 1e-12) also bends sharply for p - threshold below about
sqrt(threshold * 1e-12), where float32 rounding of p - threshold moves its gradient: it needs a wider margin.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import pytest
import torch

from daad_ext import block_memory
from daad_ext.reference import assemble_blocks, divide_blocks, similarity_ref
from daad_ext.spec import check_inputs, check_options, make_division


def near_tie_rows(x: torch.Tensor, memory: torch.Tensor, division: Sequence[int], similarity: str,
                  shrink: str, threshold: Optional[float], temperature: float,
                  margin: float) -> torch.Tensor:
    """(B, Q) mask of the queries whose kept set could flip under a relative error of ``margin``."""
    geometry = check_inputs(x, memory, division)
    threshold = check_options(similarity, shrink, threshold, temperature, memory.shape[0])
    if shrink == "none":
        return torch.zeros(x.shape[0], geometry.num_queries, dtype=torch.bool)
    queries = divide_blocks(x.detach().double().cpu(), geometry)
    p = torch.softmax(similarity_ref(queries, memory.detach().double().cpu(), similarity)
                      / temperature, dim=-1)
    ties = ((p - threshold).abs() <= margin * threshold).any(dim=-1)
    if shrink == "hard" and p.shape[-1] > 1:
        top2 = p.topk(2, dim=-1).values
        decides = top2[..., 0] < threshold * (1 + margin)
        ties |= decides & (top2[..., 0] - top2[..., 1] <= margin * top2[..., 0])
    return ties


def tie_free_inputs(shape: Sequence[int], num_items: int, division: Sequence[int],
                    similarity: str = "cosine", shrink: str = "hard",
                    threshold: Optional[float] = None, temperature: float = 1.0,
                    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                    margin: Optional[float] = None, tries: int = 50,
                    transform: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``x`` (B, C, H, W) and ``memory`` (N, D) with no near-tie at the threshold.

    ``margin`` defaults to a relative 1e-4 (1e-3 for MemAE's shrinkage). ``transform(x, memory)``,
    when given, changes the drawn inputs (in place) before they are checked for ties.
    """
    if margin is None:
        margin = 1e-3 if shrink == "memae" else 1e-4
    b, c, h, w = shape
    d = (c // division[2]) * (h // division[0]) * (w // division[1])
    for attempt in range(tries):
        gen = torch.Generator().manual_seed(seed + 7919 * attempt)
        x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
        memory = torch.randn(num_items, d, generator=gen, dtype=torch.float64)
        x, memory = x.to(device=device, dtype=dtype), memory.to(device=device, dtype=dtype)
        if transform is not None:
            transform(x, memory)
        if not near_tie_rows(x, memory, division, similarity, shrink, threshold, temperature,
                             margin).any():
            return x, memory
    raise RuntimeError(f"no tie-free inputs in {tries} tries; use a smaller shape or margin")


def forward_backward(backend: str, x: torch.Tensor, memory: torch.Tensor, grad_y, grad_w,
                     options: dict):
    """(y, w, grad x, grad memory) of ``backend`` for the loss <y, grad_y> + <w, grad_w> (a None
    gradient leaves its output out of the loss)."""
    x = x.detach().requires_grad_()
    memory = memory.detach().requires_grad_()
    y, w = block_memory(x, memory, backend=backend, **options)
    loss = sum((out * g).sum() for out, g in ((y, grad_y), (w, grad_w)) if g is not None)
    loss.backward()
    return y.detach(), w.detach(), x.grad, memory.grad


def assert_matches_reference(backend: str, x: torch.Tensor, memory: torch.Tensor,
                             division: Sequence[int], similarity: str = "cosine",
                             shrink: str = "hard", threshold: Optional[float] = None,
                             temperature: float = 1.0, through: Sequence[str] = ("y", "w"),
                             atol: float = 1e-5, rtol: float = 1e-4, seed: int = 0) -> None:
    """Forward (y, w) and the gradients of x and memory of ``backend`` against the reference.

    The reference runs in float64 on the same inputs, so the tolerance measures the backend's own
    error. ``through`` chooses which outputs the loss (a random linear function) reads.
    """
    options = dict(division=division, similarity=similarity, shrink=shrink, threshold=threshold,
                   temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    b, q, n = x.shape[0], division[0] * division[1] * division[2], memory.shape[0]
    grad_y = torch.randn(x.shape, generator=gen, dtype=torch.float64) if "y" in through else None
    grad_w = torch.randn(b, q, n, generator=gen, dtype=torch.float64) if "w" in through else None

    def cast(g, like):
        return None if g is None else g.to(device=like.device, dtype=like.dtype)

    got = forward_backward(backend, x, memory, cast(grad_y, x), cast(grad_w, x), options)
    want = forward_backward("reference", x.double(), memory.double(), cast(grad_y, x.double()),
                            cast(grad_w, x.double()), options)
    for name, g, r in zip(("y", "w", "grad x", "grad memory"), got, want):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        torch.testing.assert_close(g.double().cpu(), r.cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")
    return got


# Inputs with all-zero blocks and an all-zero memory item, or blocks and an item whose norms are
# below the floor 1e-12 (cosine: no gradient flows through the similarity to them;
# daad_ext/reference.py).
#: (image, query) of the zero blocks, and the zero item.
ZERO_BLOCKS = ((0, 0), (-1, -1))
ZERO_ITEM = 1


def zero_rows(division: Sequence[int],
              scale: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A ``transform`` for :func:`tie_free_inputs` that multiplies ZERO_BLOCKS and ZERO_ITEM by
    ``scale``: 0 makes them all zero, 1e-14 leaves them nonzero with norms below the floor."""
    def transform(x: torch.Tensor, memory: torch.Tensor) -> None:
        geometry = make_division(*x.shape[1:], division)
        blocks = divide_blocks(x, geometry)
        for b, k in ZERO_BLOCKS:
            blocks[b, k] *= scale
        x.copy_(assemble_blocks(blocks, geometry))
        memory[ZERO_ITEM] *= scale
    return transform


def zero_block_grads(grad_x: torch.Tensor, division: Sequence[int]) -> list[torch.Tensor]:
    """The blocks of ``grad_x`` at ZERO_BLOCKS."""
    blocks = divide_blocks(grad_x, make_division(*grad_x.shape[1:], division))
    return [blocks[b, k] for b, k in ZERO_BLOCKS]


def output_path_grad(w: torch.Tensor, grad_y: torch.Tensor,
                     division: Sequence[int]) -> torch.Tensor:
    """sum over queries of w_i * dL/dy_block, in float64: the gradient of the memory through
    y = w M alone (all of it for an item whose similarity path is zero)."""
    blocks = divide_blocks(grad_y.double(), make_division(*grad_y.shape[1:], division))
    return torch.einsum("bqn,bqd->nd", w.double(), blocks)


def assert_refuses_tensors_on_another_device(forward: Callable, backward: Callable,
                                             x: torch.Tensor, memory: torch.Tensor,
                                             options: tuple) -> None:
    """Each tensor argument of a raw forward/backward op pair, moved alone to the meta device, is
    refused with an error that names it (``options``: rh, rw, rc, similarity, shrink, threshold,
    temperature)."""
    same_device = "x and memory must be on the same device"
    for moved in ((x.to("meta"), memory), (x, memory.to("meta"))):
        with pytest.raises((ValueError, RuntimeError), match=same_device):
            forward(*moved, *options)
    y, w, probs, row_stats, item_norms = forward(x, memory, *options)
    tensors = dict(grad_y=torch.randn_like(y), grad_w=torch.randn_like(w), x=x, memory=memory,
                   w=w, probs=probs, row_stats=row_stats, item_norms=item_norms)
    for name, tensor in tensors.items():
        args = dict(tensors, **{name: tensor.to("meta")})
        message = same_device if name in ("x", "memory") else f"{name} must be on {x.device}"
        with pytest.raises((ValueError, RuntimeError), match=message):
            backward(*args.values(), *options, True, True)
