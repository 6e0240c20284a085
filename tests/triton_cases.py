"""The interpreter cases of the ``"triton"`` backend and the helpers the GPU tests share.

Each case is a function registered in :data:`CASES` by name; tests/test_triton.py reports one test
per case, run in this process when it is interpreted (``TRITON_INTERPRET=1``) or else by
tests/triton_runner.py in a subprocess. Without a GPU the kernels run in Triton's interpreter
(CPU float32).

A case that forces a path or a tiling calls the launchers (``daad_ext.triton.launch``) with its
own ``TritonConfig``; the registered ops, and so the cases that go through ``block_memory`` and
autograd, run with the environment's ``DEFAULT``.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Optional

import pytest
import torch

from helpers import (assert_matches_reference, assert_refuses_tensors_on_another_device,
                     tie_free_inputs, zero_block_grads, zero_rows)

CASES: dict[str, Callable[[], None]] = {}


def _case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def triton_package():
    import daad_ext.triton
    return daad_ext.triton


def triton_config(path: str = "auto", splits: Optional[int] = None, tiles: str = "small",
            autotune: Optional[bool] = None):
    """DEFAULT with a forced path, D splits, interpreter tiles (and autotuning, if given)."""
    mod = triton_package()
    changes = dict(path=path, splits=splits, interpreter_tiles=tiles)
    if autotune is not None:
        changes["autotune"] = autotune
    return dataclasses.replace(mod.DEFAULT, **changes)


def _options(memory, similarity="cosine", shrink="hard", threshold=None, temperature=1.0):
    from daad_ext.spec import check_options
    threshold = check_options(similarity, shrink, threshold, temperature, memory.shape[0])
    return (similarity, shrink, threshold, float(temperature))


def run_launchers(config, x, memory, division, grad_y, grad_w, needs=(True, True), **options):
    """(y, w, grad x, grad memory) from the launchers under ``config``."""
    from daad_ext.triton import launch
    args = tuple(division) + _options(memory, **options)
    y, w, *saved = launch.forward(x, memory, *args, config=config)
    grad_x, grad_m = launch.backward(grad_y, grad_w, x, memory, w, *saved, *args, *needs,
                                     config=config)
    return y, w, grad_x, grad_m


def reference_grads(x, memory, division, grad_y, grad_w, **options):
    """(y, w, grad x, grad memory) of the float64 reference for the loss <y, gy> + <w, gw>."""
    from daad_ext import block_memory_ref
    x = x.detach().double().cpu().requires_grad_()
    memory = memory.detach().double().cpu().requires_grad_()
    y, w = block_memory_ref(x, memory, division, **options)
    sum((out * g.double().cpu()).sum() for out, g in ((y, grad_y), (w, grad_w))
        if g is not None).backward()
    return y.detach(), w.detach(), x.grad, memory.grad


def loss_grads(x, division, items, through=("y", "w"), seed=0):
    """Random (grad_y, grad_w) of x's dtype and device; None for an output the loss skips."""
    gen = torch.Generator().manual_seed(seed)
    b, q = x.shape[0], division[0] * division[1] * division[2]
    grad_y = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grad_w = torch.randn(b, q, items, generator=gen, dtype=torch.float64)
    return tuple(g.to(x) if name in through else None
                 for name, g in (("y", grad_y), ("w", grad_w)))


def _assert_close(got, want, atol=1e-5, rtol=1e-4, what=""):
    for name, g, r in zip(("y", "w", "grad x", "grad memory"), got, want):
        assert g.shape == r.shape, f"{what} {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        torch.testing.assert_close(g.double().cpu(), r, atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def assert_launch_matches(config, x, memory, division, through=("y", "w"), atol=1e-5, rtol=1e-4,
                          **options):
    """The launchers under ``config`` against the reference, forward and both gradients."""
    grad_y, grad_w = loss_grads(x, division, memory.shape[0], through)
    _assert_close(run_launchers(config, x, memory, division, grad_y, grad_w, **options),
                  reference_grads(x, memory, division, grad_y, grad_w, **options), atol, rtol,
                  f"triton {config.path}")


# -------------------------------------------------------------------------------------------------
# Interpreter cases (CPU float32). Shapes: x (2, 8, 6, 6) with division (2, 2, 1) gives Q = 4
# queries per image and D = 72 (not a multiple of the 16-wide tiles; two D splits on the tiled
# path); N = 20 (not a power of two); B*Q = 8 rows (fewer than a 16-row tile).
# -------------------------------------------------------------------------------------------------
SHAPE, DIVISION, ITEMS = (2, 8, 6, 6), (2, 2, 1), 20
PATHS = ("fused", "tiled")


def _match(path, shape, items, division, through=("y", "w"), splits=None, transform=None,
           tiles="small", **options):
    x, memory = tie_free_inputs(shape, items, division, **options)
    if transform is not None:
        x, memory = transform(x, memory)
    assert_launch_matches(triton_config(path, splits, tiles), x, memory, division, through,
                          **options)


for _path in PATHS:
    for _sim, _temperature in (("cosine", 0.5), ("dot", 4.0)):
        for _shrink in ("hard", "memae", "none"):
            _case(f"match-{_path}-{_sim}-{_shrink}")(
                lambda p=_path, s=_sim, k=_shrink, t=_temperature: _match(
                    p, SHAPE, ITEMS, DIVISION, similarity=s, shrink=k, temperature=t))

    def _layouts(x, memory):
        # channels_last input and a memory with transposed strides (N, D) -> strides (1, N).
        return x.to(memory_format=torch.channels_last), memory.t().contiguous().t()

    # rc > 1, channels_last x, non-contiguous memory, a threshold of its own.
    _case(f"layout-{_path}")(lambda p=_path: _match(
        p, SHAPE, 13, (2, 2, 2), transform=_layouts, shrink="hard", threshold=0.06))
    # Gradients through y only and through w only (the kernels' HAS_GW / HAS_GY branches).
    _case(f"through-y-{_path}")(lambda p=_path: _match(
        p, SHAPE, ITEMS, DIVISION, through=("y",), similarity="dot", shrink="memae",
        temperature=4.0))
    _case(f"through-w-{_path}")(lambda p=_path: _match(
        p, SHAPE, ITEMS, DIVISION, through=("w",), similarity="cosine", shrink="hard"))


# The largest autotuning tiles (fused: 32 rows x 32 columns, two 16-row partial sums per
# program; tiled: tiles of 128 rows or items), on 80 rows: three fused programs, the last one
# partial, and one partial tiled row tile.
for _path in PATHS:
    _case(f"large-tiles-{_path}")(lambda p=_path: _match(
        p, (5, 8, 12, 12), 50, (4, 4, 1), tiles="large", similarity="cosine", shrink="hard",
        temperature=0.1))


@_case("tiled-four-splits")
def _four_splits():
    # D = 16*4*4 = 256 in four D splits of 64 columns, reduced in order by the row kernels.
    _match("tiled", (1, 16, 8, 8), 24, (2, 2, 1), splits=4, similarity="cosine", shrink="memae")


def _large_n(similarity, shrink, temperature):
    # N = 1100 > 1024: padded to 2048, beyond the fused path, so "auto" and even "fused" take the
    # tiled path (item chunks of 256, online softmax); D = 72 in two splits. Through the
    # registered op and autograd. (A low temperature spreads the cosine weights, so that few of
    # the 1100 lie near the threshold.)
    from daad_ext.triton import tuning
    for path in ("auto", "fused"):
        assert not tuning.use_fused(8, 2048, torch.device("cpu"), triton_config(path))
    x, memory = tie_free_inputs(SHAPE, 1100, DIVISION, similarity=similarity, shrink=shrink,
                                temperature=temperature)
    assert_matches_reference("triton", x, memory, DIVISION, similarity=similarity,
                             shrink=shrink, temperature=temperature)


_case("large-n-cosine-hard")(lambda: _large_n("cosine", "hard", 0.1))
_case("large-n-dot-memae")(lambda: _large_n("dot", "memae", 1.0))


def _zero_rows(path, shrink, scale):
    # Two blocks and an item all zero (scale 0) or below the norm floor (1e-14): no gradient flows
    # through the cosine similarity to them, so the blocks' gradient is exactly 0 (helpers.py).
    # A threshold below 1/N keeps a zero block's uniform weights (1/N each) clear of it.
    options = dict(shrink=shrink, threshold=None if shrink == "none" else 0.5 / ITEMS,
                   temperature=0.5)
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION, **options,
                                transform=zero_rows(DIVISION, scale))
    grad_y, grad_w = loss_grads(x, DIVISION, ITEMS)
    got = run_launchers(triton_config(path), x, memory, DIVISION, grad_y, grad_w, **options)
    _assert_close(got, reference_grads(x, memory, DIVISION, grad_y, grad_w, **options),
                  what=f"triton {path}")
    assert all((block == 0).all() for block in zero_block_grads(got[2], DIVISION))


def _determinism(path):
    x, memory = tie_free_inputs((2, 8, 8, 8), 40, (2, 2, 1), shrink="memae")
    grads = loss_grads(x, (2, 2, 1), 40)
    first, second = (run_launchers(triton_config(path), x, memory, (2, 2, 1), *grads,
                                   shrink="memae") for _ in range(2))
    for name, a, b in zip(("y", "w", "grad x", "grad memory"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def _nan_rows(path):
    # NaN in one block: NaN in that query's weights and output block (as the reference), the
    # other rows untouched, and the backward does not crash.
    from daad_ext import block_memory_ref
    for shrink in ("hard", "memae", "none"):
        x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION, shrink=shrink)
        x[1, 2, 4, 1] = float("nan")  # image 1, block (ih, iw) = (1, 0): query 2
        grads = (torch.ones_like(x), torch.ones(2, 4, ITEMS))
        y, w, _, _ = run_launchers(triton_config(path), x, memory, DIVISION, *grads, shrink=shrink)
        y_ref, w_ref = block_memory_ref(x.double(), memory.double(), DIVISION, shrink=shrink)
        assert torch.isnan(w[1, 2]).all(), shrink
        assert torch.equal(torch.isnan(w), torch.isnan(w_ref)), shrink
        assert torch.equal(torch.isnan(y), torch.isnan(y_ref)), shrink


def _needs_grad(path):
    # A gradient not asked for is neither computed nor allocated: an empty (0,) tensor of x's
    # dtype and device; the other is bit for bit what the full backward gives (every reduction
    # runs in a fixed order).
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION, shrink="memae")
    grads = loss_grads(x, DIVISION, ITEMS)
    for similarity in ("cosine", "dot"):
        run = {needs: run_launchers(triton_config(path), x, memory, DIVISION, *grads, needs=needs,
                                    similarity=similarity, shrink="memae")[2:]
               for needs in ((True, True), (True, False), (False, True), (False, False))}
        grad_x, grad_m = run[True, True]
        assert grad_x.shape == x.shape and grad_m.shape == memory.shape
        assert torch.equal(run[True, False][0], grad_x), similarity
        assert torch.equal(run[False, True][1], grad_m), similarity
        for empty in (run[True, False][1], run[False, True][0], *run[False, False]):
            assert empty.shape == (0,) and empty.dtype == x.dtype and empty.device == x.device


@_case("needs-grad-autograd")
def _needs_grad_autograd():
    # Through the op's autograd: a frozen memory gets no gradient (None), x's is unchanged; and
    # the other way round.
    from daad_ext import block_memory
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION)
    grad_y, grad_w = loss_grads(x, DIVISION, ITEMS)

    def grads(x_grad, m_grad):
        xi, mi = x.clone().requires_grad_(x_grad), memory.clone().requires_grad_(m_grad)
        y, w = block_memory(xi, mi, DIVISION, backend="triton")
        ((y * grad_y).sum() + (w * grad_w).sum()).backward()
        return xi.grad, mi.grad

    both = grads(True, True)
    x_only, m_none = grads(True, False)
    x_none, m_only = grads(False, True)
    assert m_none is None and x_none is None
    assert torch.equal(x_only, both[0]) and torch.equal(m_only, both[1])


def _sparse_view(tmp: str, size, stride, values: torch.Tensor) -> torch.Tensor:
    """A float32 view of ``size`` and ``stride`` into a sparse file just long enough for it,
    mapped copy-on-write: gigabytes of address space, only the touched pages in memory."""
    span = 1 + sum((n - 1) * s for n, s in zip(size, stride))
    path = os.path.join(tmp, f"sparse{len(os.listdir(tmp))}")
    with open(path, "wb") as f:
        f.truncate(span * 4)
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=span * 4)
    view = torch.empty(0).set_(storage, 0, tuple(size), tuple(stride))
    view.copy_(values)
    return view


def _large_strides(path):
    # A (1, 4, 2, 2) view of x whose channel stride is 2**30 elements and a memory whose column
    # stride is 2**30: block and item offsets beyond 2**31 (12 GiB sparse files, nothing big
    # allocated). With int32 offsets the kernels read out of bounds.
    shape, division, items = (1, 4, 2, 2), (2, 2, 1), 5  # Q = 4, D = 4
    x, memory = tie_free_inputs(shape, items, division)
    with tempfile.TemporaryDirectory() as tmp:
        x_view = _sparse_view(tmp, shape, (0, 2**30, 2, 1), x)
        m_view = _sparse_view(tmp, memory.shape, (1, 2**30), memory)
        grad_y, grad_w = loss_grads(x, division, items)
        got = run_launchers(triton_config(path), x_view, m_view, division, grad_y, grad_w)
        _assert_close(got, reference_grads(x, memory, division, grad_y, grad_w), what=path)
        del x_view, m_view


for _path in PATHS:
    _case(f"nan-rows-{_path}")(lambda p=_path: _nan_rows(p))
    for _shrink in ("hard", "memae", "none"):
        for _scale in (0.0, 1e-14):
            _case(f"zero-rows-{_path}-{_shrink}-{_scale:g}")(
                lambda p=_path, k=_shrink, c=_scale: _zero_rows(p, k, c))
    _case(f"deterministic-{_path}")(lambda p=_path: _determinism(p))
    _case(f"needs-grad-{_path}")(lambda p=_path: _needs_grad(p))
    _case(f"large-strides-{_path}")(lambda p=_path: _large_strides(p))


@_case("raw-op-checks")
def _raw_op_checks():
    # The raw ops refuse what the C++ ops refuse, with the same messages, and what the Triton
    # kernels cannot do (float64, sizes beyond their indexing), before launching anything.
    from daad_ext.triton.config import MAX_BLOCK_DIM, MAX_ITEMS, MAX_ROWS
    forward = torch.ops.daad_ext.block_memory_forward_triton
    backward = torch.ops.daad_ext.block_memory_backward_triton
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION)
    options = ("cosine", "hard", 0.05, 1.0)
    bad = [
        ((x, memory, 2, 2, 3) + options, ValueError, "C=8 is not divisible by rc=3"),
        ((x.double(), memory.double(), *DIVISION) + options, TypeError, "support float32"),
        ((x, memory.double(), *DIVISION) + options, TypeError, "same dtype"),
        ((x[0], memory, *DIVISION) + options, ValueError, "4-D tensor"),
        ((x, memory[:, :70], *DIVISION) + options, ValueError, "item length D=70"),
        ((x, memory, *DIVISION, "cosine", "hard", 0.05, 1e-39), ValueError, "underflows"),
        ((x, memory, *DIVISION, "cosine", "hard", 0.05, float("inf")), ValueError,
         "temperature"),
        ((x, memory, *DIVISION, "cosine", "hard", 1.5, 1.0), ValueError, "threshold"),
        ((x, memory, *DIVISION, "cos", "hard", 0.05, 1.0), ValueError, "unknown similarity"),
        # Beyond the limits, with expanded tensors (nothing allocated): B*Q, N, D.
        ((x[:1].expand(MAX_ROWS // 4 + 1, -1, -1, -1), memory, *DIVISION) + options,
         ValueError, "B\\*Q"),
        ((x, memory[:1].expand(MAX_ITEMS + 1, -1), *DIVISION) + options, ValueError, "N "),
        ((torch.zeros(1, 1, 1, 1).expand(1, 1, 1, MAX_BLOCK_DIM + 1),
          torch.zeros(1, 1).expand(1, MAX_BLOCK_DIM + 1), 1, 1, 1) + options,
         ValueError, "D "),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            forward(*args)
    y, w, probs, stats, norms = forward(x, memory, *DIVISION, *options)
    saved = (x, memory, w, probs, stats, norms, *DIVISION) + options + (True, True)
    bad_backward = [
        ((y[:1], None) + saved, "grad_y must have shape"),
        ((None, w.double()) + saved, "grad_w must have dtype"),
        ((y, None, x, memory, w[:, :2]) + saved[3:], "w must have shape"),
        ((y, None, x, memory, w, probs, stats.double()) + saved[5:], "row_stats must have dtype"),
        ((y, None) + saved[:-6] + ("cosine", "hard", 0.05, 1e-39, True, True), "underflows"),
    ]
    for args, message in bad_backward:
        with pytest.raises((ValueError, TypeError), match=message):
            backward(*args)
    for shrink in ("memae", "hard"):  # probs: MemAE's, else a placeholder
        assert_refuses_tensors_on_another_device(forward, backward, x, memory,
                                                 (*DIVISION, "cosine", shrink, 0.05, 1.0))


@_case("dispatch-and-layer")
def _dispatch():
    from daad_ext import BlockMemory, available_backends, block_memory, block_memory_ref
    assert "triton" in available_backends("cpu", torch.float32)
    assert "triton" not in available_backends("cpu", torch.float64)
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION)
    with pytest.raises(ValueError, match="not available"):
        block_memory(x.double(), memory.double(), DIVISION, backend="triton")
    layer = BlockMemory(8, 6, 6, num_items=ITEMS, division=DIVISION, backend="triton")
    with torch.no_grad():
        layer.memory.copy_(memory)
    y, w = layer(x, return_weights=True)
    y_ref, w_ref = block_memory_ref(x.double(), memory.double(), DIVISION)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.double(), w_ref, atol=1e-5, rtol=1e-4)


@_case("one-check-a-call")
def _one_check_a_call():
    # block_memory and BlockMemory leave the checks to the Triton op: spec.check_call runs once
    # in the forward and once in the backward (whose op checks its own call).
    from daad_ext import BlockMemory, block_memory, spec
    checks = []
    check_inputs = spec.check_inputs

    def counted(*args, **kwargs):
        checks.append(1)
        return check_inputs(*args, **kwargs)

    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION)
    layer = BlockMemory(8, 6, 6, num_items=ITEMS, division=DIVISION, backend="triton")
    spec.check_inputs = counted
    try:
        for run in (lambda xi: block_memory(xi, memory, DIVISION, backend="triton")[0],
                    lambda xi: layer(xi)):
            xi = x.clone().requires_grad_()
            y = run(xi)
            assert len(checks) == 1, f"{len(checks)} checks in the forward"
            y.sum().backward()
            assert len(checks) == 2, f"{len(checks) - 1} checks in the backward"
            checks.clear()
    finally:
        spec.check_inputs = check_inputs


@_case("opcheck-registration")
def _opcheck_cpu():
    # Schema, autograd registration and fake tensors. (AOT dispatch traces interpreted kernels on
    # fake tensors, which the interpreter cannot run: that check runs on the GPU.)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck(torch.device("cpu"), torch.float32, utils)


def opcheck(device, dtype, utils=None, shape=SHAPE, items=ITEMS, division=DIVISION):
    ops = torch.ops.daad_ext
    x, memory = tie_free_inputs(shape, items, division, shrink="memae", dtype=dtype,
                                device=str(device), margin=1e-9)  # no reference here
    options = tuple(division) + ("cosine", "memae", 1.0 / items, 1.0)
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(ops.block_memory_forward_triton.default,
                          (x.requires_grad_(), memory.requires_grad_()) + options, **kwargs)
    y, w, probs, stats, norms = ops.block_memory_forward_triton(x.detach(), memory.detach(),
                                                                *options)
    for grad_y, grad_w, needs in ((torch.randn_like(y), torch.randn_like(w), (True, True)),
                                  (torch.randn_like(y), None, (True, False)),
                                  (None, torch.randn_like(w), (False, True))):
        torch.library.opcheck(ops.block_memory_backward_triton.default,
                              (grad_y, grad_w, x.detach(), memory.detach(), w, probs, stats, norms)
                              + options + needs, **kwargs)
