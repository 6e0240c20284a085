"""Tests of the ``"cuda"`` backend: the C++ op's CUDA kernels (csrc/cuda/).

Without a GPU (our machines and CI):

* the CUDA kernels are registered whenever the extension was built with them (CI builds them with
  ``nvcc`` on every run; under CI a build without them where a toolkit exists fails the run:
  tests/conftest.py);
* the package imports and works on CPU when built with CUDA and no GPU is present;
* the warp-parallel form of the shared row epilogue against its serial form
  (tests/cpp/team_check.cpp, 32 std::threads as the team);
* the host execution layer itself (tests/cpp/cuda_host_selftest.cpp), and its sanitizer reports:
  a race between blocks under ThreadSanitizer, a shared-memory overflow at the faulting access
  under AddressSanitizer (tests/cpp/cuda_host_sanitizer_check.cpp);
* the rules of CI's sm_90 resource check (tests/cpp/resource_usage.py) on canned ptxas output;
* every correctness test below with the ``cuda_host`` target: the same kernel sources and host code
  compiled for the CPU on the host execution layer (tests/cpp/cuda_host/, csrc/cuda/README.md),
  in the build that ``DAAD_CUDA_HOST`` names (plain by default; ``make test-cuda-host`` runs the
  ThreadSanitizer and ASan + UBSan builds).

With the ``cuda`` target on a GPU (skipped otherwise), and on the host layer: forward and backward
against the float64 reference in float32 (on CUDA cores, and with TF32), float16 and bfloat16,
through y and/or w, every similarity and shrink; shapes of several tiles (partial tiles, the split
of the D loop, rc > 1); strided inputs; bitwise determinism of grad M; NaN rows; empty batches; bad
arguments to the op itself. On a GPU only: ``opcheck``, ``torch.compile(fullgraph=True)`` of
``BlockMemory``, N > 1024 and DAAD's own scale.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from typing import NamedTuple

import pytest
import torch

import cuda_host_build
from daad_ext import BlockMemory, available_backends, block_memory, functional, ops, spec
from daad_ext.functional import Backend
from daad_ext.reference import block_memory_ref, divide_blocks
from helpers import assert_matches_reference, tie_free_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMILARITIES = ("cosine", "dot")
SHRINKS = ("hard", "memae", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _extension_has_cuda_code() -> bool:
    """Whether daad_ext._C was compiled with csrc/cuda: the extension says so itself."""
    return "cuda" in ops.KERNEL_DEVICES


HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not (HAS_GPU and _extension_has_cuda_code()),
                               reason="needs a CUDA GPU and daad_ext built with its CUDA kernels")


# ----------------------------------------------------------------------------------------------
# Without a GPU


def test_cuda_kernels_registered_when_built_with_cuda():
    built = _extension_has_cuda_code()
    if not built:  # a required run (CI) has failed already where a toolkit exists (conftest.py)
        pytest.skip("daad_ext._C was built without its CUDA kernels (no toolkit or DAAD_EXT_NO_CUDA=1)")
    for dtype in DTYPES:
        assert "cuda" in available_backends("cuda", dtype)
    assert "cuda" not in available_backends("cuda", torch.float64)
    assert "cuda" not in available_backends("cpu", torch.float32)


def test_cpu_works_whatever_the_build():
    """Importing and running on CPU must not need a GPU, even when built with CUDA."""
    x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 4 * 4 * 4)
    y, w = block_memory(x, memory, (2, 2, 1))
    y_ref, w_ref = block_memory_ref(x, memory, (2, 2, 1))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
    assert "cuda" not in available_backends("cpu")
    with pytest.raises(ValueError, match="not available"):
        block_memory(x, memory, (2, 2, 1), backend="cuda")


def _cannot_run(reason: str) -> None:
    """Skips a host-layer test that cannot run here; in CI (cuda_host_build.required()) fails it
    with the reason instead, since CI is where it must run."""
    if cuda_host_build.required():
        pytest.fail(f"{reason} (CI=true / DAAD_REQUIRE_EXTENSION=1: host-layer tests must run)")
    pytest.skip(reason)


@pytest.mark.parametrize("ci", [{"CI": "true"}, {"DAAD_REQUIRE_EXTENSION": "1"}, {}], ids=str)
def test_host_layer_tests_fail_in_ci_when_they_cannot_run(monkeypatch, ci):
    """Without the toolkit's headers the host-layer tests skip, except in CI, where they fail."""
    for name in ("CI", "DAAD_REQUIRE_EXTENSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ci.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cuda_host_build, "cuda_include_dir", lambda: None)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="toolkit's headers"):
        _require_toolkit_headers()


def _run_cpp(name: str, *flags: str, runs=((),), env=None) -> list[subprocess.CompletedProcess]:
    """Compiles tests/cpp/<name>.cpp with the host compiler and runs it with each argument list
    of ``runs``."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        _cannot_run("no host C++ compiler")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(ROOT, "tests", "cpp", f"{name}.cpp"), os.path.join(tmp, name)
        build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", *flags, src, "-o", exe],
                               capture_output=True, text=True)
        if build.returncode != 0 and "barrier" in build.stderr:
            _cannot_run(f"host compiler lacks C++20 <barrier>: {build.stderr[-300:]}")
        assert build.returncode == 0, build.stderr
        return [subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                               env=env) for args in runs]


def _host_layer_flags() -> tuple[str, ...]:
    _require_toolkit_headers()
    return ("-isystem", cuda_host_build.cuda_include_dir(), "-include",
            os.path.join(cuda_host_build.HOST_DIR, "cuda_host.h"))


def test_team_epilogue_matches_serial_epilogue():
    (run,) = _run_cpp("team_check", "-I", os.path.join(ROOT, "csrc"))
    assert run.returncode == 0, run.stdout + run.stderr


def test_host_layer_selftest():
    """The host execution layer computes barriers, shuffles and WMMA right and reports each rule
    it enforces (barrier divergence, deadlock, lanes missing from a shuffle, ldm, alignment,
    warp-uniform arguments, shared memory per block and its bounds); __float_to_tf32 rounds as
    cvt.rna."""
    (run,) = _run_cpp("cuda_host_selftest", *_host_layer_flags())
    assert run.returncode == 0, run.stdout + run.stderr


def _source_line(name: str, marker: str) -> str:
    """"<name>.cpp:<line>" of the line of tests/cpp/<name>.cpp that contains ``marker``."""
    with open(os.path.join(ROOT, "tests", "cpp", f"{name}.cpp")) as f:
        (line,) = [i for i, text in enumerate(f, 1) if marker in text]
    return f"{name}.cpp:{line}"


def test_host_layer_reports_races_between_blocks():
    """Under ThreadSanitizer, blocks resident at the same time are unordered: a plain += into a
    counter that every block updates is reported as a race between two blocks; atomicAdd is not."""
    race, atomic = _run_cpp("cuda_host_sanitizer_check", "-g", "-fsanitize=thread",
                            *_host_layer_flags(), runs=(("race",), ("atomic",)))
    assert "WARNING: ThreadSanitizer: data race" in race.stderr, race.stdout + race.stderr
    assert _source_line("cuda_host_sanitizer_check", "void count_plain") in race.stderr
    assert atomic.returncode == 0 and "ThreadSanitizer" not in atomic.stderr, atomic.stderr


def test_host_layer_reports_shared_memory_overflow_at_the_access():
    """Under AddressSanitizer, the guard after a block's shared array is poisoned: a write one
    element past its end is reported at that write."""
    (run,) = _run_cpp("cuda_host_sanitizer_check", "-g", "-fsanitize=address",
                      *_host_layer_flags(), runs=(("overflow",),),
                      env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    assert "ERROR: AddressSanitizer: use-after-poison" in run.stderr, run.stdout + run.stderr
    assert _source_line("cuda_host_sanitizer_check", "writes past the end") in run.stderr


def _resource_usage():
    """tests/cpp/resource_usage.py, the sm_90 resource table of CI, as a module."""
    spec = importlib.util.spec_from_file_location(
        "resource_usage", os.path.join(ROOT, "tests", "cpp", "resource_usage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resource_table_fails_on_spills_smem_and_registers():
    """The resource check of CI reads ptxas -v and the PTX's launch bounds as nvcc 13 writes them
    and flags a spill, static shared memory over 48 KB and registers below the launch bounds."""
    ru = _resource_usage()
    log = """\
ptxas info    : Compiling entry function '_Z4goodPf' for 'sm_90'
ptxas info    : Function properties for _Z4goodPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 254 registers, used 1 barriers, 33792 bytes smem
ptxas info    : Compiling entry function '_Z6spillsPf' for 'sm_90'
ptxas info    : Function properties for _Z6spillsPf
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z3bigPf' for 'sm_90'
ptxas info    : Function properties for _Z3bigPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 50000 bytes smem
ptxas info    : Compiling entry function '_Z6greedyPf' for 'sm_90'
ptxas info    : Function properties for _Z6greedyPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 130 registers, used 1 barriers
"""
    ptx = """\
.visible .entry _Z4goodPf(
\t.param .u64 _Z4goodPf_param_0
)
.maxntid 256, 1, 1
{
}
.visible .entry _Z6greedyPf(
\t.param .u64 _Z6greedyPf_param_0
)
.maxntid 128, 2, 1
.minnctapersm 2
{
}
"""
    usage = ru.parse_ptxas(log)
    bounds = ru.parse_launch_bounds(ptx)
    assert usage["_Z4goodPf"] == dict(registers=254, spill_stores=0, spill_loads=0, smem=33792)
    assert usage["_Z6spillsPf"] == dict(registers=255, spill_stores=8, spill_loads=4, smem=0)
    assert bounds == {"_Z4goodPf": (256, 0), "_Z6greedyPf": (256, 2)}
    rows = {name: ru.Usage(name, **u, max_threads=bounds.get(name, (0, 0))[0],
                           min_blocks=bounds.get(name, (0, 0))[1]) for name, u in usage.items()}
    assert ru.blocks_by_registers(rows["_Z4goodPf"]) == 1  # 256 registers a lane, 8 warps
    assert ru.violations(rows["_Z4goodPf"]) == []
    assert "spills" in ru.violations(rows["_Z6spillsPf"])[0]
    assert "more than 48 KB" in ru.violations(rows["_Z3bigPf"])[0]
    assert "ask for 2" in ru.violations(rows["_Z6greedyPf"])[0]  # 136 x 256 x 2 > 64K
    assert "_Z6greedyPf" in ru.table(list(rows.values()))


# ----------------------------------------------------------------------------------------------
# The CUDA op on a GPU ("cuda") and on the host execution layer ("cuda_host": the same kernel
# sources compiled for the CPU, tests/cpp/cuda_host/, built by tests/cuda_host_build.py; the
# sanitizer builds run with DAAD_CUDA_HOST=tsan or asan, see `make test-cuda-host`).

#: Tolerances against the float64 reference. Half types store w, y and the gradients in 16 bits
#: (the reference itself run in bfloat16 is about 2e-2 off); the epilogue runs in float32.
TOLERANCES = {torch.float32: dict(atol=5e-5, rtol=5e-4),
              torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}

_host_ops = None


def _require_toolkit_headers() -> None:
    """The host build needs the CUDA toolkit's headers."""
    if cuda_host_build.cuda_include_dir() is None:
        _cannot_run("the CUDA toolkit's headers are needed for the host build; set CUDA_HOME")


def _host_backend() -> Backend:
    """The emulated op as a backend on CPU tensors (built once per process, never in "auto")."""
    global _host_ops
    if _host_ops is None:
        _require_toolkit_headers()
        _host_ops = cuda_host_build.load(cuda_host_build.variant_from_env())
        ns = cuda_host_build.NAMESPACE
        ops.register_fused_op(f"{ns}::block_memory_forward", f"{ns}::block_memory_backward",
                              _host_ops.block_memory_backward)

    def run(x, memory, geometry, similarity, shrink, threshold, temperature):
        y, w, *_ = _host_ops.block_memory_forward(x, memory, geometry.rh, geometry.rw,
                                                  geometry.rc, similarity, shrink, threshold,
                                                  temperature)
        return y, w

    return Backend(lambda device, dtype: device.type == "cpu" and dtype in DTYPES, run)


class Target(NamedTuple):
    backend: str   # "cuda" or "cuda_host"
    device: str    # where its tensors live
    op: object     # its torch.ops namespace


@pytest.fixture(params=[pytest.param("cuda", marks=needs_gpu), "cuda_host"])
def target(request, monkeypatch) -> Target:
    if request.param == "cuda":
        return Target("cuda", "cuda", torch.ops.daad_ext)
    monkeypatch.setitem(functional.BACKENDS, "cuda_host", _host_backend())
    return Target("cuda_host", "cpu", _host_ops)


def _temperature(similarity: str) -> float:
    # Spreads the softmax, so that few weights sit near the threshold.
    return 0.2 if similarity == "cosine" else 1.0


def _inputs(target, shape, num_items, division, similarity, shrink, dtype, seed=0,
            temperature=None, threshold=None):
    """Tie-free inputs on the target's device; half types keep a 5% margin from the threshold."""
    temperature = _temperature(similarity) if temperature is None else temperature
    margin = None if dtype == torch.float32 else 0.05
    x, memory = tie_free_inputs(shape, num_items, division, similarity, shrink, threshold,
                                temperature, dtype=dtype, device=target.device, seed=seed,
                                margin=margin)
    return x, memory, dict(division=division, similarity=similarity, shrink=shrink,
                           threshold=threshold, temperature=temperature)


@pytest.fixture
def no_tf32():
    """float32 products in full fp32 (PyTorch's default), whatever the session set."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("through", [("y", "w"), ("y",), ("w",)], ids="+".join)
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(target, dtype, similarity, shrink, through, no_tf32):
    if dtype == torch.float32:
        shape, num_items, division = (2, 8, 8, 8), 13, (2, 2, 2)
    else:  # a short D spreads the cosine similarities, so that a 5% margin is found
        shape, num_items, division = (2, 4, 4, 4), 11, (2, 2, 1)
    x, memory, options = _inputs(target, shape, num_items, division, similarity, shrink, dtype,
                                 seed=1)
    assert_matches_reference(target.backend, x, memory, through=through, **options,
                             **TOLERANCES[dtype])


# Shapes beyond one tile: B*Q > 64 rows, N > 128 items and N > 1024, D above 128 and not a
# multiple of 32, D long enough that the similarity's D loop is split across CTAs, rc > 1.
SHAPES = [
    ((3, 6, 10, 14), 1500, (2, 7, 3), "cosine", "none"),
    ((5, 12, 9, 9), 130, (3, 3, 2), "dot", "memae"),
    ((4, 16, 16, 16), 70, (4, 4, 1), "cosine", "hard"),
    ((2, 64, 32, 32), 300, (4, 4, 1), "cosine", "none"),
    ((2, 64, 32, 32), 300, (4, 4, 1), "dot", "hard"),
    ((1, 3, 5, 7), 1, (1, 1, 1), "cosine", "none"),
]
#: The host layer's shapes: every tile and warp of every kernel at a fraction of the work.
#: R = 96, 90, 72 rows (two row tiles, the second ragged; 9 to 12 row-kernel blocks); N = 150
#: (two item tiles, the second ragged); D = 336, 216, 160 (two or three D tiles, the last ragged;
#: the first D is split over two slices of 192 and 144 by choose_split); rc = 2 and 3.
HOST_SHAPES = [
    ((3, 16, 24, 28), 150, (4, 4, 2), "cosine", "hard"),
    ((3, 12, 18, 30), 150, (3, 5, 2), "dot", "memae"),
    ((2, 12, 32, 15), 150, (4, 3, 3), "cosine", "none"),
    ((1, 3, 5, 7), 1, (1, 1, 1), "cosine", "none"),
]


def _shapes(target):
    return SHAPES if target.backend == "cuda" else HOST_SHAPES


@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_shapes(target, case, no_tf32):
    shapes = _shapes(target)
    if case >= len(shapes):
        pytest.skip("fewer shapes on this target")
    shape, num_items, division, similarity, shrink = shapes[case]
    x, memory, options = _inputs(target, shape, num_items, division, similarity, shrink,
                                 torch.float32)
    assert_matches_reference(target.backend, x, memory, **options, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_core_shapes(target, dtype, no_tf32):
    """The tensor-core paths (TF32 for float32, fp16, bf16) on shapes of several tiles."""
    torch.backends.cuda.matmul.allow_tf32 = True
    shape, num_items, division, similarity, _ = _shapes(target)[2]  # every tile, ragged edges
    # no shrinkage: half-precision similarities put some weight near any threshold at N = 150
    x, memory, options = _inputs(target, shape, num_items, division, similarity, "none", dtype)
    tol = TOLERANCES[dtype] if dtype != torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert_matches_reference(target.backend, x, memory, **options, **tol)


def test_float16_small_norms(target):
    """float16 inputs with small norms (|q|, |m_i| ~ 4e-3): the backward's intermediate
    A = dL/ds / (|q||m_i|) exceeds float16's 65504 while grad x and grad M stay far below it, so
    the kernels keep A in float32 (kernels.cuh). Both gradients must be finite and match the
    float64 reference to float16 accuracy relative to their own scale."""
    scale = 2.0 ** -10  # exact in float16: the cosine similarities and w are those at unit scale
    x, memory, options = _inputs(target, (2, 4, 4, 4), 11, (2, 2, 1), "cosine", "none",
                                 torch.float16, seed=1)
    x, memory = x * scale, memory * scale
    grad_w = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def gradients(backend, dtype):
        xx = x.detach().to(dtype).requires_grad_()
        mm = memory.detach().to(dtype).requires_grad_()
        _, w = block_memory(xx, mm, backend=backend, **options)
        (w.double() * grad_w.to(w.device)).sum().backward()
        return xx.grad, mm.grad

    # The premise: A itself, the gradient of the loss with respect to the raw dot products <q, m_i>.
    geometry = spec.check_call(x, memory, options["division"], "cosine", "none", None,
                               options["temperature"])[0]
    queries = divide_blocks(x.detach().double().cpu(), geometry)
    items = memory.detach().double().cpu()
    dots = (queries @ items.t()).requires_grad_()
    norms = queries.norm(dim=-1, keepdim=True) * items.norm(dim=-1)
    ((dots / norms / options["temperature"]).softmax(-1) * grad_w).sum().backward()
    assert dots.grad.abs().max() > torch.finfo(torch.float16).max

    for name, got, want in zip(("grad x", "grad M"), gradients(target.backend, torch.float16),
                               gradients("reference", torch.float64)):
        assert got.isfinite().all(), f"{name} is not finite"
        assert want.abs().max() < torch.finfo(torch.float16).max / 10
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-2,
                                   atol=1e-2 * want.abs().max().item(), msg=name)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_daad_scale(dtype, no_tf32):
    """DAAD's scale 3 at batch 2 (D=4096, N=500, Q=64): forward and backward against float64.
    GPU only: the host shapes reach the same tiles and warps at a fraction of the work."""
    target = Target("cuda", "cuda", torch.ops.daad_ext)
    x, memory, options = _inputs(target, (2, 256, 32, 32), 500, (8, 8, 1), "cosine", "none",
                                 dtype, temperature=0.05)
    tol = dict(atol=2e-4, rtol=2e-3) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_matches_reference(target.backend, x, memory, **options, **tol)


def test_tf32(target, no_tf32):
    """With TF32 allowed, float32 products run on tensor cores with a TF32 tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = True
    x, memory, options = _inputs(target, (2, 4, 4, 4), 11, (2, 2, 1), "cosine", "hard",
                                 torch.float32, seed=1)
    assert_matches_reference(target.backend, x, memory, **options, atol=1e-2, rtol=1e-2)


def test_strided_inputs(target, no_tf32):
    """channels_last and sliced inputs give the results of their contiguous copies, bit for bit,
    forward and backward (grad_y strided like x, and not); y is NCHW, or channels_last for a
    channels_last x (as from a convolution)."""
    shape, num_items, division, similarity, shrink = _shapes(target)[0]
    x, memory, options = _inputs(target, shape, num_items, division, similarity, shrink,
                                 torch.float32)
    grad_y = torch.randn_like(x)

    def run(inp, g):
        inp = inp.detach().requires_grad_()
        mem = memory.detach().requires_grad_()
        y, w = block_memory(inp, mem, backend=target.backend, **options)
        channels_last = inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous()
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        (y * g).sum().add(w.square().sum()).backward()
        return y, w, inp.grad, mem.grad

    want = run(x, grad_y)
    h, wd = x.shape[2:]
    for strided in (x.to(memory_format=torch.channels_last),
                    x.transpose(2, 3).contiguous().transpose(2, 3),
                    torch.cat([x, x], dim=3)[..., :wd],
                    torch.cat([x, torch.zeros_like(x)], dim=1)[:, :x.shape[1]]):
        assert torch.equal(strided, x)
        assert not strided.is_contiguous()
        for g in (grad_y, grad_y.to(memory_format=torch.channels_last)):
            for got, expected in zip(run(strided, g), want):
                assert torch.equal(got, expected)


@pytest.mark.parametrize("similarity,shrink", [("cosine", "hard"), ("dot", "memae")])
def test_skipped_gradient(target, similarity, shrink, no_tf32):
    """A gradient autograd does not ask for is None; the other is bit for bit the same."""
    shape, num_items, division, *_ = _shapes(target)[2]
    x, memory, options = _inputs(target, shape, num_items, division, similarity, shrink,
                                 torch.float32)
    grad_y = torch.randn_like(x)

    def grads(x_grad, memory_grad):
        xg, mg = x.clone().requires_grad_(x_grad), memory.clone().requires_grad_(memory_grad)
        y, w = block_memory(xg, mg, backend=target.backend, **options)
        (y * grad_y).sum().add(w.square().sum()).backward()
        return xg.grad, mg.grad

    both, x_only, memory_only = grads(True, True), grads(True, False), grads(False, True)
    assert x_only[1] is None and memory_only[0] is None
    assert torch.equal(x_only[0], both[0]) and torch.equal(memory_only[1], both[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(target, dtype, no_tf32):
    """Two runs give the same bits: no atomics anywhere, grad M included."""
    if target.backend == "cuda":
        shape, num_items, division = (4, 64, 32, 32), 500, (8, 8, 1)
    else:
        shape, num_items, division = (3, 6, 24, 30), 150, (4, 6, 1)
    gen = torch.Generator().manual_seed(0)
    d = shape[1] // division[2] * (shape[2] // division[0]) * (shape[3] // division[1])
    x = torch.randn(*shape, generator=gen).to(target.device, dtype)
    memory = torch.randn(num_items, d, generator=gen).to(target.device, dtype)

    def run():
        xx, mm = x.clone().requires_grad_(), memory.clone().requires_grad_()
        y, w = block_memory(xx, mm, division, backend=target.backend)
        (y.float().square().sum() + w.float().log1p().sum()).backward()
        return y, w, xx.grad, mm.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_opcheck(dtype, shrink):
    target = Target("cuda", "cuda", torch.ops.daad_ext)
    x, memory, options = _inputs(target, (2, 4, 4, 4), 11, (2, 2, 1), "cosine", shrink, dtype,
                                 seed=1)
    threshold = 1.0 / memory.shape[0]
    args = (x.requires_grad_(), memory.requires_grad_(), 2, 2, 1, "cosine", shrink, threshold,
            options["temperature"])
    torch.library.opcheck(torch.ops.daad_ext.block_memory_forward.default, args)
    with torch.no_grad():
        y, w, probs, stats, norms = torch.ops.daad_ext.block_memory_forward(*args)
    grads = (torch.randn_like(y), torch.randn_like(w))
    for grad_y, grad_w in (grads, (grads[0], None), (None, grads[1])):
        for needs in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.daad_ext.block_memory_backward.default,
                                  (grad_y, grad_w, x.detach(), memory.detach(), w, probs, stats,
                                   norms, *args[2:], *needs))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_compile_fullgraph(dtype, no_tf32):
    torch._dynamo.reset()
    layer = BlockMemory(channels=8, height=8, width=8, num_items=13, division=(2, 2, 2),
                        temperature=0.2, backend="cuda").to(device="cuda", dtype=dtype)
    x = torch.randn(2, 8, 8, 8, device="cuda", dtype=dtype)  # eager and compiled: same kernels
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        y, w = fn(xx, return_weights=True)
        (y.float().square().sum() + w.float().sum()).backward()
        results.append((y.detach(), w.detach(), xx.grad, layer.memory.grad.clone()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the loss around the layer may fuse differently
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=tol, rtol=tol)


def test_nan_rows(target):
    x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 4 * 4 * 4)
    x, memory = x.to(target.device), memory.to(target.device)
    x[1, 0, 5, 6] = float("nan")  # in block ih=1, iw=1 (query 3) of image 1
    y, w = block_memory(x, memory, (2, 2, 1), backend=target.backend)
    assert w[1, 3].isnan().all() and y[1, :, 4:, 4:].isnan().all()
    w[1, 3] = 0
    y[1, :, 4:, 4:] = 0
    assert w.isfinite().all() and y.isfinite().all()


def test_empty_batch(target):
    x = torch.randn(0, 4, 8, 8, device=target.device, requires_grad=True)
    memory = torch.randn(10, 4 * 4 * 4, device=target.device, requires_grad=True)
    y, w = block_memory(x, memory, (2, 2, 1), backend=target.backend)
    assert y.shape == x.shape and w.shape == (0, 4, 10)
    (y.sum() + w.sum()).backward()
    assert x.grad is None or x.grad.shape == x.shape
    assert memory.grad is None or torch.equal(memory.grad, torch.zeros_like(memory))


def test_op_checks_its_arguments(target):
    """The C++ op checks what daad_ext/spec.py checks, for callers that bypass Python."""
    fwd = target.op.block_memory_forward
    x = torch.randn(2, 4, 8, 8, device=target.device)
    memory = torch.randn(10, 64, device=target.device)
    good = (x, memory, 2, 2, 1, "cosine", "hard", 0.1, 1.0)
    fwd(*good)
    bad = {"D=": (x, memory[:, :60]) + good[2:],
           "divided evenly": (x, memory, 3, 2, 1) + good[5:],
           "same dtype": (x, memory.double()) + good[2:],
           "supports float32": (x.double(), memory.double()) + good[2:],
           "unknown similarity": good[:5] + ("l2",) + good[6:],
           "unknown shrink": good[:6] + ("soft",) + good[7:],
           "threshold": good[:7] + (0.0, 1.0),
           "temperature": good[:8] + (0.0,),
           "4-D": (x[0], memory) + good[2:]}
    for message, args in bad.items():
        with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
            fwd(*args)


@needs_gpu
@pytest.mark.parametrize("similarity,shrink", [("cosine", "hard"), ("dot", "memae")])
def test_gpu_skipped_gradient_is_none_and_the_other_unchanged(similarity, shrink, no_tf32):
    gpu = Target("cuda", "cuda", torch.ops.daad_ext)
    x, memory, options = _inputs(gpu, (3, 8, 16, 16), 70, (2, 2, 2), similarity, shrink, torch.float32)

    def grads(x_grad, memory_grad):
        xx = x.clone().requires_grad_(x_grad)
        mm = memory.clone().requires_grad_(memory_grad)
        y, w = block_memory(xx, mm, backend="cuda", **options)
        (y.square().sum() + w.sum()).backward()
        return xx.grad, mm.grad

    both, x_only, memory_only = grads(True, True), grads(True, False), grads(False, True)
    assert x_only[1] is None and memory_only[0] is None
    assert torch.equal(x_only[0], both[0]) and torch.equal(memory_only[1], both[1])


@needs_gpu
def test_gpu_index_limits_refused_before_launch():
    """Sizes beyond the kernel's index arithmetic (block_memory_cuda.cu: N, D <= 65535 * 128,
    B*Q < 2^30) raise a clear error; expanded tensors, so nothing big is allocated."""
    fwd = torch.ops.daad_ext.block_memory_forward
    x = torch.zeros(1, 1, 1, 1, device="cuda").expand(2, 4, 8, 8)
    too_many = torch.zeros(1, 64, device="cuda").expand(65535 * 128 + 1, 64)
    with pytest.raises(RuntimeError, match="N, D <= 8388480, got .*N=8388481"):
        fwd(x, too_many, 2, 2, 1, "cosine", "hard", 0.5, 1.0)
    wide = torch.zeros(1, 1, 1, 1, device="cuda").expand(1, 65535 * 128 + 1, 1, 1)
    with pytest.raises(RuntimeError, match="D=8388481"):
        fwd(wide, torch.zeros(1, 1, device="cuda").expand(3, 65535 * 128 + 1), 1, 1, 1,
            "dot", "none", 0.5, 1.0)
    rows = torch.zeros(1, 1, 1, 1, device="cuda").expand(2**24, 1, 8, 8)  # B*Q = 2^30
    with pytest.raises(RuntimeError, match="got B\\*Q=1073741824"):
        fwd(rows, torch.zeros(3, 1, device="cuda"), 8, 8, 1, "dot", "none", 0.5, 1.0)
