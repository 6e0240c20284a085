"""Property-based differential test: every backend available on this machine against the float64
reference, forward and both gradients, on random shapes, divisions, options, dtypes, layouts and
magnitudes (hypothesis).

The budget is about 20 s per dtype by default (deterministic examples, so CI is reproducible);
``DAAD_FUZZ_SECONDS=300`` spends that long per dtype on fresh random examples.

Tie-awareness. The hard shrinkage is discontinuous at ``p_i = threshold`` and, where the row maximum
decides, at ``p_1 = p_2``; MemAE's bends sharply just above ``threshold``. A row whose float64 softmax
lies within the dtype's rounding of such a point, or in MemAE's bend ("fragile"), has no unique
answer, so it is
compared by a tie-invariant property instead: its outputs are left out, and the random upstream
gradients are zero on it, which makes both gradients independent of which items it kept (its
dL/dw is then zero, so it contributes nothing to grad x or grad M). The rounding of a logit
``z = s / T`` is bounded by ``eps * sqrt(D) * zscale`` with ``zscale`` = |q| max|m| / T (dot) or
1 / T (cosine); the same bound sets the tolerances, in units of each output's own scale.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import strategies as st

from daad_ext import available_backends, block_memory
from daad_ext.reference import assemble_blocks, divide_blocks, similarity_ref
from daad_ext.spec import MEMAE_EPS, check_options, make_division

_BUDGET_ENV = os.environ.get("DAAD_FUZZ_SECONDS")
BUDGET_S = float(_BUDGET_ENV) if _BUDGET_ENV else 20.0
#: Rounding units of a logit within which a row is fragile.
FRAGILE_UNITS = {"hard": 64.0, "memae": 64.0, "none": 0.0}
#: MemAE's u(p) = (p - threshold) p / (p - threshold + eps) has du/dp = 1 + p eps / (p - threshold)^2 + ...: within
#: this many sqrt(p eps) of threshold its gradient is amplified (up to p / eps) past what rounding allows.
MEMAE_BEND = 32.0
#: Rounding units the outputs may differ by.
TOLERANCE_UNITS = 64.0

MAGNITUDES_X = (0.0, 1e-14, 1e-6, 1e-2, 1.0, 10.0, 1e3)   # 0: x all zero; 1e-14: below the norm floor
MAGNITUDES_M = (1e-3, 1.0, 1e2)
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")


@st.composite
def cases(draw):
    if draw(st.booleans()):  # (H, W, 1): one query per pixel, D = C
        rh, rw, rc = draw(st.integers(1, 6)), draw(st.integers(1, 6)), 1
        bc, bh, bw = draw(st.integers(1, 8)), 1, 1
    else:
        rh, rw, rc = (draw(st.integers(1, 4)) for _ in range(3))
        bc, bh, bw = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    n = draw(st.one_of(st.integers(1, 12), st.integers(13, 400)))
    shrink = draw(st.sampled_from(("hard", "memae", "none")))
    threshold = draw(st.one_of(st.none(), st.floats(1e-4, 1.0),
                               st.floats(0.2, 5.0).map(lambda f, n=n: min(1.0, f / n))))
    return dict(
        shape=(draw(st.integers(0, 3)), bc * rc, bh * rh, bw * rw), num_items=n,
        division=(rh, rw, rc), similarity=draw(st.sampled_from(("cosine", "dot"))), shrink=shrink,
        threshold=threshold,
        temperature=draw(st.sampled_from((1.0, 0.5, 2.0, 0.05, 10.0)) | st.floats(0.01, 50.0)),
        x_scale=draw(st.sampled_from(MAGNITUDES_X)), m_scale=draw(st.sampled_from(MAGNITUDES_M)),
        x_layout=draw(st.sampled_from(LAYOUTS)), m_layout=draw(st.sampled_from(LAYOUTS[::2])),
        zero_block=draw(st.booleans()), zero_item=draw(st.booleans()),
        through=draw(st.sampled_from(("yw", "y", "w"))), seed=draw(st.integers(0, 2**31 - 1)))


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a twice as wide tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed":  # the last two dimensions swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def make_inputs(case, dtype):
    gen = torch.Generator().manual_seed(case["seed"])
    b, c, h, w = case["shape"]
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64) * case["x_scale"]
    geometry = make_division(c, h, w, case["division"])
    memory = torch.randn(case["num_items"], geometry.block_dim, generator=gen,
                         dtype=torch.float64) * case["m_scale"]
    if case["zero_block"] and b > 0:
        x[0, :geometry.bc, :geometry.bh, :geometry.bw] = 0
    if case["zero_item"]:
        memory[0] = 0
    grad_y = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grad_w = torch.randn(b, geometry.num_queries, case["num_items"], generator=gen,
                         dtype=torch.float64)
    # Rounded to the dtype first, so that the float64 oracle sees the backend's exact inputs.
    x, memory, grad_y, grad_w = (t.to(dtype).double() for t in (x, memory, grad_y, grad_w))
    return geometry, x, memory, grad_y, grad_w


def analyse(case, geometry, x, memory, dtype):
    """(fragile (B, Q) mask, rounding, gain) of the float64 softmax; see the module docstring.

    ``rounding`` bounds the relative rounding of p (and of its logits); ``gain`` = the largest
    1 / (the re-normalisation's divisor) of a non-fragile row: the kept sum for hard, MemAE's sum
    of u, which amplify dL/dw and, for MemAE (where it can be tiny), the rounding of w itself."""
    threshold = check_options(case["similarity"], case["shrink"], case["threshold"],
                        case["temperature"], case["num_items"])
    queries = divide_blocks(x, geometry)
    temperature = case["temperature"]
    if case["similarity"] == "cosine":
        zscale = torch.full(queries.shape[:2], 1.0 / temperature, dtype=torch.float64)
    else:
        zscale = (torch.linalg.vector_norm(queries, dim=-1)
                  * torch.linalg.vector_norm(memory, dim=-1).max() / temperature)
    rounding = torch.finfo(dtype).eps * math.sqrt(geometry.block_dim) * (1 + zscale)
    p = torch.softmax(similarity_ref(queries, memory, case["similarity"]) / temperature, dim=-1)
    margin = (FRAGILE_UNITS[case["shrink"]] * rounding).unsqueeze(-1)
    near = (p - threshold).abs()
    fragile = (near <= margin * torch.maximum(p, torch.tensor(threshold))).any(-1)
    if case["shrink"] == "memae":
        fragile |= (near <= MEMAE_BEND * (p * MEMAE_EPS).sqrt()).any(-1)
    divisor = torch.ones(p.shape[:-1], dtype=torch.float64)
    if case["shrink"] == "hard":
        divisor = (p * ((p >= threshold) | (p == p.amax(-1, keepdim=True)))).sum(-1)
    elif case["shrink"] == "memae":
        divisor = (torch.relu(p - threshold) * p / ((p - threshold).abs() + MEMAE_EPS)).sum(-1).clamp_min(MEMAE_EPS)
    gain = _max(1 / divisor[~fragile], 1.0)
    if case["shrink"] == "hard" and p.shape[-1] > 1:
        top = p.topk(2, dim=-1).values
        decides = top[..., 0] < threshold * (1 + margin[..., 0])
        fragile |= decides & (top[..., 0] - top[..., 1] <= margin[..., 0] * top[..., 0])
    return fragile, _max(rounding), gain


def run(backend, x, memory, grad_y, grad_w, case):
    x = x.detach().requires_grad_()
    memory = memory.detach().requires_grad_()
    y, w = block_memory(x, memory, case["division"], case["similarity"], case["shrink"],
                        case["threshold"], case["temperature"], backend=backend)
    loss = 0
    if "y" in case["through"]:
        loss = loss + (y * grad_y).sum()
    if "w" in case["through"]:
        loss = loss + (w * grad_w).sum()
    loss.backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in (x, memory)]
    return [t.detach().double() for t in (y, w, *grads)]


def gradient_scales(case, geometry, x, memory, grad_y, grad_w, gain):
    """Magnitudes of the terms each gradient sums (its own value may cancel to far below them):
    |dL/dz| times the largest |dz/dq| (x) or |dz/dm| summed over the rows (memory)."""
    queries = divide_blocks(x, geometry)
    q_norm = torch.linalg.vector_norm(queries, dim=-1).clamp_min(1e-12)
    m_norm = torch.linalg.vector_norm(memory, dim=-1).clamp_min(1e-12)
    t = case["temperature"]
    g_max = (_max(grad_w.abs()) + _max(grad_y.abs()) * _max(m_norm)) * gain
    if case["similarity"] == "cosine":
        dz_dq, dz_dm = 1 / (t * -_max(-q_norm, -1.0)), 1 / (t * float(m_norm.min()))
    else:
        dz_dq, dz_dm = _max(m_norm) / t, _max(q_norm) / t
    rows = max(1, queries.shape[0] * queries.shape[1])
    return {"grad x": g_max * dz_dq, "grad memory": rows * (g_max * dz_dm + _max(grad_y.abs()))}


def _max(t: torch.Tensor, empty: float = 0.0) -> float:
    return float(t.max()) if t.numel() else empty


def check_case(case, dtype, counts):
    geometry, x, memory, grad_y, grad_w = make_inputs(case, dtype)
    fragile, rounding, gain = analyse(case, geometry, x, memory, dtype)
    counts["cases"] += 1
    counts["rows"] += fragile.numel()
    counts["fragile rows"] += int(fragile.sum())
    # Tie-invariant comparison of the fragile rows: no upstream gradient through them.
    keep = (~fragile).to(torch.float64)
    grad_w = grad_w * keep.unsqueeze(-1)
    rows_of_y = keep.unsqueeze(-1).expand(*keep.shape, geometry.block_dim)
    grad_y = grad_y * _assemble(rows_of_y, geometry)
    want = run("reference", x, memory, grad_y, grad_w, case)
    tol = TOLERANCE_UNITS * rounding * (gain if case["shrink"] == "memae" else 1.0)
    scales = {"y": float(memory.abs().max()), "w": 1.0,
              **gradient_scales(case, geometry, x, memory, grad_y, grad_w, gain)}
    for backend in available_backends("cpu", dtype):
        got = run(backend, with_layout(x.to(dtype), case["x_layout"]),
                  with_layout(memory.to(dtype), case["m_layout"]), grad_y.to(dtype),
                  grad_w.to(dtype), case)
        for name, g, r in zip(("y", "w", "grad x", "grad memory"), got, want):
            assert g.shape == r.shape, f"{backend} {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
            if name == "y":
                g, r = (divide_blocks(t, geometry)[~fragile] for t in (g, r))
            elif name == "w":
                g, r = g[~fragile], r[~fragile]
            scale = max(scales[name], _max(r.abs()))
            torch.testing.assert_close(
                g, r, atol=tol * scale, rtol=0,
                msg=lambda m, backend=backend, name=name: f"{backend} {name} ({dtype}): {m}\n{case}")


def _assemble(blocks, geometry):
    return assemble_blocks(blocks, geometry)


def _fuzz(dtype):
    deadline = time.monotonic() + BUDGET_S
    counts = {"cases": 0, "rows": 0, "fragile rows": 0}

    # Quiet: the end of the budget is an exception to hypothesis, which it would report as a
    # failure to reproduce; a real failure's message carries its case.
    @settings(max_examples=100_000, deadline=None, derandomize=_BUDGET_ENV is None,
              database=None, suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(case=cases())
    def property_holds(case):
        if time.monotonic() > deadline:
            raise _BudgetSpent
        check_case(case, dtype, counts)

    try:
        property_holds()
    except _BudgetSpent:
        pass
    print(f"fuzz {dtype}: {counts}, backends {available_backends('cpu', dtype)}")
    assert counts["cases"] > 0


class _BudgetSpent(BaseException):
    """Ends the search when the time budget is spent (hypothesis has no time limit; a
    BaseException, which it propagates at once instead of shrinking)."""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backends_agree_with_the_float64_reference(dtype):
    _fuzz(dtype)
