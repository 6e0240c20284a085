"""Tests of the ``"triton"`` backend (daad_ext/triton/).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU float32). The
interpreter must be on before the kernels are defined, that is before ``daad_ext`` is imported,
which another test module may already have done in this process. So, unless this process runs
interpreted already (``TRITON_INTERPRET=1 pytest tests/test_triton.py``), the interpreter cases run
once in a subprocess (``python tests/test_triton.py --interpreter-cases OUT.json``, with the GPU
hidden) and each ``test_interpreter[...]`` reports its own case's result. On a machine with a GPU
they are skipped unless ``DAAD_TRITON_INTERPRETER_TESTS=1`` (CI runs them; the one-call GPU check
has no time to spare). The interpreter mishandles bf16 ``tl.dot`` and accepts tile shapes that a
GPU rejects, so ``test_kernels_compile_for_sm90`` compiles every kernel for the H200 on CPU, and
the ``test_gpu_*`` tests (skipped without CUDA) run the real kernels in float32, float16 and
bfloat16, ``opcheck``, autotuning and ``torch.compile(fullgraph=True)``.

A case that forces a path or a tiling calls the launchers (``daad_ext.triton.launch``) with its
own ``TritonConfig``; the registered ops, and so the cases that go through ``block_memory`` and
autograd, run with the environment's ``DEFAULT`` (``DAAD_TRITON_AUTOTUNE=0`` saves compile time
on a GPU: ``benchmarks/gpu_check.sh`` sets it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

import pytest
import torch

from helpers import (assert_matches_reference, assert_refuses_tensors_on_another_device,
                     tie_free_inputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES: dict[str, Callable[[], None]] = {}


def _case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def _triton():
    import daad_ext.triton
    return daad_ext.triton


def _config(path: str = "auto", splits: Optional[int] = None, tiles: str = "small",
            autotune: Optional[bool] = None):
    """DEFAULT with a forced path, D splits, interpreter tiles (and autotuning, if given)."""
    mod = _triton()
    changes = dict(path=path, splits=splits, interpreter_tiles=tiles)
    if autotune is not None:
        changes["autotune"] = autotune
    return dataclasses.replace(mod.DEFAULT, **changes)


def _options(memory, similarity="cosine", shrink="hard", threshold=None, temperature=1.0):
    from daad_ext.spec import check_options
    lam = check_options(similarity, shrink, threshold, temperature, memory.shape[0])
    return (similarity, shrink, lam, float(temperature))


def _launch(config, x, memory, division, grad_y, grad_w, needs=(True, True), **options):
    """(y, w, grad x, grad memory) from the launchers under ``config``."""
    from daad_ext.triton import launch
    args = tuple(division) + _options(memory, **options)
    y, w, *saved = launch.forward(x, memory, *args, config=config)
    grad_x, grad_m = launch.backward(grad_y, grad_w, x, memory, w, *saved, *args, *needs,
                                     config=config)
    return y, w, grad_x, grad_m


def _reference(x, memory, division, grad_y, grad_w, **options):
    """(y, w, grad x, grad memory) of the float64 reference for the loss <y, gy> + <w, gw>."""
    from daad_ext import block_memory_ref
    x = x.detach().double().cpu().requires_grad_()
    memory = memory.detach().double().cpu().requires_grad_()
    y, w = block_memory_ref(x, memory, division, **options)
    sum((out * g.double().cpu()).sum() for out, g in ((y, grad_y), (w, grad_w))
        if g is not None).backward()
    return y.detach(), w.detach(), x.grad, memory.grad


def _loss_grads(x, division, items, through=("y", "w"), seed=0):
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
    grad_y, grad_w = _loss_grads(x, division, memory.shape[0], through)
    _assert_close(_launch(config, x, memory, division, grad_y, grad_w, **options),
                  _reference(x, memory, division, grad_y, grad_w, **options), atol, rtol,
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
    assert_launch_matches(_config(path, splits, tiles), x, memory, division, through, **options)


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


# The largest autotuning tiles (fused: 64 rows x 64 columns, four 16-row partial sums per
# program; tiled: 128-wide tiles), on more rows than one tile holds.
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
        assert not tuning.use_fused(8, 2048, torch.device("cpu"), _config(path))
    x, memory = tie_free_inputs(SHAPE, 1100, DIVISION, similarity=similarity, shrink=shrink,
                                temperature=temperature)
    assert_matches_reference("triton", x, memory, DIVISION, similarity=similarity,
                             shrink=shrink, temperature=temperature)


_case("large-n-cosine-hard")(lambda: _large_n("cosine", "hard", 0.1))
_case("large-n-dot-memae")(lambda: _large_n("dot", "memae", 1.0))


def _zero_block(path):
    # An all-zero block is valid: the cosine's norm floors give s = 0, uniform weights, and the
    # norm's gradient is zero there. (Every item is the row maximum, so no threshold tie.)
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION)
    x[1, :, 3:, :3] = 0.0
    assert_launch_matches(_config(path), x, memory, DIVISION)


def _determinism(path):
    x, memory = tie_free_inputs((2, 8, 8, 8), 40, (2, 2, 1), shrink="memae")
    grads = _loss_grads(x, (2, 2, 1), 40)
    first, second = (_launch(_config(path), x, memory, (2, 2, 1), *grads, shrink="memae")
                     for _ in range(2))
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
        y, w, _, _ = _launch(_config(path), x, memory, DIVISION, *grads, shrink=shrink)
        y_ref, w_ref = block_memory_ref(x.double(), memory.double(), DIVISION, shrink=shrink)
        assert torch.isnan(w[1, 2]).all(), shrink
        assert torch.equal(torch.isnan(w), torch.isnan(w_ref)), shrink
        assert torch.equal(torch.isnan(y), torch.isnan(y_ref)), shrink


def _needs_grad(path):
    # A gradient not asked for is neither computed nor allocated: an empty (0,) tensor of x's
    # dtype and device; the other is bit for bit what the full backward gives (every reduction
    # runs in a fixed order).
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION, shrink="memae")
    grads = _loss_grads(x, DIVISION, ITEMS)
    for similarity in ("cosine", "dot"):
        run = {needs: _launch(_config(path), x, memory, DIVISION, *grads, needs=needs,
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
    grad_y, grad_w = _loss_grads(x, DIVISION, ITEMS)

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
        grad_y, grad_w = _loss_grads(x, division, items)
        got = _launch(_config(path), x_view, m_view, division, grad_y, grad_w)
        _assert_close(got, _reference(x, memory, division, grad_y, grad_w), what=path)
        del x_view, m_view


for _path in PATHS:
    _case(f"nan-rows-{_path}")(lambda p=_path: _nan_rows(p))
    _case(f"zero-block-{_path}")(lambda p=_path: _zero_block(p))
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


@_case("opcheck-registration")
def _opcheck_cpu():
    # Schema, autograd registration and fake tensors. (AOT dispatch traces interpreted kernels on
    # fake tensors, which the interpreter cannot run: that check runs on the GPU.)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    _opcheck(torch.device("cpu"), torch.float32, utils)


def _opcheck(device, dtype, utils=None, shape=SHAPE, items=ITEMS, division=DIVISION):
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


def run_cases(names) -> dict:
    """Runs interpreter cases; returns {name: {"ok", "error", "seconds"}}."""
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            CASES[name]()
            results[name] = {"ok": True, "error": ""}
        except BaseException:  # noqa: BLE001  (report every failure, keep going)
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
    return results


def _interpreted_here() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton().INTERPRETED


@pytest.fixture(scope="module")
def interpreter_results():
    """None when this process is interpreted (run in place); else the subprocess's results."""
    if not _triton().HAS_TRITON:
        pytest.skip("triton is not installed")
    if (torch.cuda.is_available() and not _interpreted_here()
            and os.environ.get("DAAD_TRITON_INTERPRETER_TESTS") != "1"):
        pytest.skip("interpreter cases run on machines without a GPU "
                    "(DAAD_TRITON_INTERPRETER_TESTS=1 to run them here)")
    if _interpreted_here():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter-cases",
                               out], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1200)
        if not os.path.exists(out):
            pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}", pytrace=False)
        with open(out) as f:
            return json.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter(name, interpreter_results):
    if interpreter_results is None:
        CASES[name]()
        return
    result = interpreter_results.get(name)
    assert result is not None, f"case {name} did not run"
    if not result["ok"]:
        pytest.fail(f"interpreter case {name} failed:\n{result['error']}", pytrace=False)


def test_imports_without_triton():
    # The package imports, and the backend says "unavailable", where Triton cannot be imported.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, daad_ext\n"
            "from daad_ext import triton as t, available_backends\n"
            "assert not t.HAS_TRITON and not t.supports(torch.device('cuda'), torch.float32)\n"
            "assert 'triton' not in available_backends('cpu') + available_backends('cuda')\n"
            "assert not hasattr(torch.ops.daad_ext, 'block_memory_forward_triton')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -------------------------------------------------------------------------------------------------
# Compilation for the H200 (sm_90) without a GPU: Triton's own compiler and ptxas build every
# kernel with the first configuration the autotuning filter keeps, so tile shapes, dtypes and
# layouts that only a real GPU compile rejects fail here, on CPU, in CI.
# -------------------------------------------------------------------------------------------------
H200_SMEM = 232448  # bytes of shared memory per block (opt-in)


def _compile_sm90(kernel, pointer_types, constexprs, config=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constexprs = dict(constexprs, **(config.kwargs if config else {}))
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in ("lam", "temperature") else "i32"
    options = {"num_warps": config.num_warps if config else 4,
               "num_stages": config.num_stages if config else 2}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.metadata.shared <= H200_SMEM, (fn.__name__, config, compiled.metadata.shared)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_kernels_compile_for_sm90(dtype):
    mod = _triton()
    if not mod.HAS_TRITON or mod.INTERPRETED:
        pytest.skip("needs triton, not in interpreter mode")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001
        pytest.skip("triton without its NVIDIA backend")
    from daad_ext.triton import fused, items, tiled, tuning
    elt = 4 if dtype == "fp32" else 2
    io = {name: dtype for name in ("x_ptr", "m_ptr", "y_ptr", "w_ptr", "p_ptr", "gy_ptr",
                                   "gw_ptr", "gx_ptr", "gm_ptr", "out_ptr")}
    config = mod.TritonConfig(autotune=False, smem_limit=H200_SMEM)

    def first(family, **args):
        return family.prune(list(family.configs), {}, config=config, **args)[0]

    n_pad = 512  # DAAD's N = 500
    _compile_sm90(fused.forward_kernel, io,
                  dict(COSINE=True, SHRINK=0, STORE_P=False, TF32=True, N_PAD=n_pad, ELT=elt),
                  first(tuning.FUSED, N_PAD=n_pad, ELT=elt))
    for need_gx, need_gm in ((True, True), (False, True), (True, False)):
        _compile_sm90(fused.backward_kernel, io,
                      dict(HAS_GY=True, HAS_GW=True, COSINE=True, SHRINK=1, NEED_GX=need_gx,
                           NEED_GM=need_gm, TF32=True, N_PAD=n_pad, ELT=4, PART_ROWS=16),
                      first(tuning.FUSED, N_PAD=n_pad, ELT=4))
    _compile_sm90(tiled.products_kernel, io, dict(STORE_SQ=True, TF32=True),
                  first(tuning.PRODUCTS))
    _compile_sm90(tiled.rows_forward_kernel, io,
                  dict(COSINE=True, SHRINK=0, STORE_P=False, BLOCK_R=16, BLOCK_N=256))
    _compile_sm90(tiled.rows_backward_kernel, io,
                  dict(HAS_GY=True, HAS_GW=True, COSINE=True, SHRINK=1, NEED_GX=True,
                       NEED_GM=True, BLOCK_R=16, BLOCK_N=256))
    for forward in (True, False):  # w @ M (input dtype) and A @ M (float32 A)
        a_type = dtype if forward else "fp32"
        _compile_sm90(tiled.rows_times_memory_kernel, dict(io, a_ptr=a_type),
                      dict(CORRECT=not forward, F32_DOT=not forward, TF32=True),
                      first(tuning.ROWS_TIMES_MEMORY))
    _compile_sm90(items.grad_memory_kernel, io,
                  dict(HAS_GY=True, COSINE=True, TF32=True),
                  first(tuning.GRAD_MEMORY))
    _compile_sm90(items.item_norms_kernel, io, dict(BLOCK_N=64, BLOCK_D=64))


# -------------------------------------------------------------------------------------------------
# GPU (real kernels). Skipped without CUDA.
# -------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
#: Error bound relative to the largest reference value, per half type.
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: D = 16*8*8 = 1024, N = 100 (padded to 128), 16 queries per image.
GPU_SHAPE, GPU_ITEMS, GPU_DIVISION = (2, 16, 32, 32), 100, (4, 4, 1)
#: Cosine similarities of random 1024-vectors are small (about +-0.03): low temperatures spread
#: the weights, so that few lie near the threshold (tie-free inputs come quickly).
GPU_OPTIONS = {"cosine-hard": dict(similarity="cosine", shrink="hard", temperature=0.05),
               "cosine-memae": dict(similarity="cosine", shrink="memae", temperature=0.02),
               "dot-none": dict(similarity="dot", shrink="none", temperature=16.0),
               "dot-memae": dict(similarity="dot", shrink="memae", temperature=16.0)}


def _gpu_config(path="auto"):
    """Compile time: each kernel variant compiles once per configuration, so the GPU tests take
    the first configuration that fits (test_gpu_autotune benchmarks them all)."""
    return _config(path, autotune=False)


def _check_half(dtype, path, shape, items, division, options):
    # A wide tie margin (half-rounded inputs must keep the float64 mask): temperatures high enough
    # that all weights stay within a factor of about 1.5 of 1/N, far above the threshold 0.2/N.
    options = dict(options, threshold=0.2 / items,
                   temperature=0.5 if options["similarity"] == "cosine" else 256.0)
    x, memory = tie_free_inputs(shape, items, division, dtype=dtype, device="cuda", margin=0.1,
                                **options)
    grads = _loss_grads(x, division, items)
    got = _launch(_gpu_config(path), x, memory, division, *grads, **options)
    want = _reference(x, memory, division, *grads, **options)
    for name, g, r in zip(("y", "w", "grad x", "grad memory"), got, want):
        assert g.dtype == dtype and g.shape == r.shape, name
        err = (g.double().cpu() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= HALF_TOL[dtype] * scale + 1e-6, (
            f"{dtype} {path} {options} {name}: max error {err:.3g}, max |ref| {scale:.3g}")


@gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("combo", ("cosine-hard", "cosine-memae", "dot-none"))
def test_gpu_float32(path, combo):
    options = GPU_OPTIONS[combo]
    x, memory = tie_free_inputs(GPU_SHAPE, GPU_ITEMS, GPU_DIVISION, device="cuda", **options)
    assert_launch_matches(_gpu_config(path), x, memory, GPU_DIVISION, atol=2e-5, rtol=2e-4,
                          **options)
    # rc > 1, channels_last, D = 8*8*8 = 512 (the same N: the same compiled kernels).
    x, memory = tie_free_inputs((2, 16, 16, 16), GPU_ITEMS, (2, 2, 2), device="cuda", **options)
    assert_launch_matches(_gpu_config(path), x.to(memory_format=torch.channels_last), memory,
                          (2, 2, 2), atol=2e-5, rtol=2e-4, **options)


@gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,combo", ((torch.float16, "cosine-hard"),
                                         (torch.bfloat16, "cosine-hard"),
                                         (torch.bfloat16, "dot-memae")),
                         ids=("fp16-cosine-hard", "bf16-cosine-hard", "bf16-dot-memae"))
def test_gpu_half(dtype, combo, path):
    _check_half(dtype, path, GPU_SHAPE, GPU_ITEMS, GPU_DIVISION, GPU_OPTIONS[combo])


@gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_gpu_large_n(dtype):
    # N = 1500 > 1024: the tiled path whatever the configured path.
    options = dict(GPU_OPTIONS["cosine-hard"], threshold=0.2 / 1500, temperature=0.5)
    if dtype == torch.float32:
        x, memory = tie_free_inputs((2, 16, 16, 16), 1500, (2, 2, 1), device="cuda", **options)
        assert_matches_reference("triton", x, memory, (2, 2, 1), atol=2e-5, rtol=2e-4, **options)
    else:
        _check_half(dtype, "fused", (2, 16, 16, 16), 1500, (2, 2, 1), options)


@gpu
@pytest.mark.parametrize("path", PATHS)
def test_gpu_deterministic(path):
    # 128 query rows: eight 16-row partial sums per item, reduced in order.
    x, memory = tie_free_inputs((8,) + GPU_SHAPE[1:], GPU_ITEMS, GPU_DIVISION, device="cuda",
                                margin=1e-9, **GPU_OPTIONS["cosine-hard"])  # no reference here
    grads = _loss_grads(x, GPU_DIVISION, GPU_ITEMS)
    first, second = (_launch(_gpu_config(path), x, memory, GPU_DIVISION, *grads,
                             **GPU_OPTIONS["cosine-hard"]) for _ in range(2))
    for name, a, b in zip(("y", "w", "grad x", "grad memory"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@gpu
def test_gpu_autotune():
    # Every configuration that fits is compiled and benchmarked on the op's own buffers; the
    # winner must still match the reference (no state left behind by the benchmark runs: the
    # fused backward's per-item partial sums have the same 16-row groups for every BLOCK_R).
    options = GPU_OPTIONS["cosine-hard"]
    # Its own TritonConfig, so its own autotuners (keyed on N, D); D = 16*16*16 = 4096.
    x, memory = tie_free_inputs((4,) + GPU_SHAPE[1:], GPU_ITEMS, (2, 2, 1), device="cuda",
                                **options)
    assert_launch_matches(_config("fused", autotune=True), x, memory, (2, 2, 1), atol=2e-5,
                          rtol=2e-4, **options)


@gpu
def test_gpu_opcheck():
    _opcheck(torch.device("cuda"), torch.float32, shape=GPU_SHAPE, items=GPU_ITEMS,
             division=GPU_DIVISION)


@gpu
def test_gpu_backend_available():
    from daad_ext import available_backends
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        names = available_backends("cuda", dtype)
        assert "triton" in names and names.index("triton") < names.index("reference")


@gpu
def test_gpu_compile_fullgraph():
    from daad_ext import BlockMemory
    torch._dynamo.reset()
    options = GPU_OPTIONS["cosine-hard"]
    layer = BlockMemory(16, 32, 32, num_items=GPU_ITEMS, division=GPU_DIVISION, backend="triton",
                        **options).cuda()
    x, memory = tie_free_inputs(GPU_SHAPE, GPU_ITEMS, GPU_DIVISION, device="cuda", **options)
    with torch.no_grad():
        layer.memory.copy_(memory)
    compiled = torch.compile(layer, fullgraph=True)

    def run(module):
        xi = x.clone().requires_grad_()
        layer.memory.grad = None
        y, w = module(xi, return_weights=True)
        (y.square().sum() + (w * w).sum()).backward()
        return y.detach(), w.detach(), xi.grad, layer.memory.grad.clone()

    for name, got, want in zip(("y", "w", "grad x", "grad memory"), run(compiled), run(layer)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":
    # python tests/test_triton.py --interpreter-cases OUT.json [NAME ...]
    if len(sys.argv) < 3 or sys.argv[1] != "--interpreter-cases":
        sys.exit(__doc__)
    sys.path.insert(0, ROOT)
    if not _interpreted_here():
        sys.exit("set TRITON_INTERPRET=1 to run the interpreter cases")
    selected = sys.argv[3:] or list(CASES)
    outcome = run_cases(selected)
    with open(sys.argv[2], "w") as f:
        json.dump(outcome, f, indent=1)
    failed = [name for name, r in outcome.items() if not r["ok"]]
    print(f"{len(outcome) - len(failed)} passed, {len(failed)} failed: {failed}")
