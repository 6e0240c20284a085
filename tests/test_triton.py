"""Tests of the ``"triton"`` backend (daad_ext/triton/).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU float32): the
cases of tests/triton_cases.py, one ``test_interpreter[...]`` each. The interpreter must be on
before the kernels are defined, that is before ``daad_ext`` is imported, which another test module
may already have done in this process; so, unless this process runs interpreted already
(``TRITON_INTERPRET=1 pytest tests/test_triton.py``), tests/triton_runner.py runs the cases once in
a subprocess with the GPU hidden. On a machine with a GPU they are skipped unless
``DAAD_TRITON_INTERPRETER_TESTS=1`` (CI runs them; the one-call GPU check has no time to spare).
The interpreter mishandles bf16 ``tl.dot`` and accepts tile shapes that a GPU rejects, so
``test_kernels_compile_for_sm90`` compiles every kernel for the H200 on CPU, and the ``test_gpu_*``
tests (skipped without CUDA) run the real kernels in float32, float16 and bfloat16, ``opcheck``,
autotuning and ``torch.compile(fullgraph=True)``, through the helpers of tests/triton_cases.py
(``DAAD_TRITON_AUTOTUNE=0`` saves compile time on a GPU: ``benchmarks/gpu_check.sh`` sets it).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import triton_runner
from helpers import assert_matches_reference, tie_free_inputs
from triton_cases import (CASES, PATHS, assert_launch_matches, loss_grads, opcheck,
                          reference_grads, run_launchers, triton_config, triton_package)

ROOT = triton_runner.ROOT


def _interpreted_here() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_package().INTERPRETED


@pytest.fixture(scope="module")
def interpreter_results():
    """None when this process is interpreted (the cases run in place); else the subprocess's
    results."""
    if not triton_package().HAS_TRITON:
        pytest.skip("triton is not installed")
    if (torch.cuda.is_available() and not _interpreted_here()
            and os.environ.get("DAAD_TRITON_INTERPRETER_TESTS") != "1"):
        pytest.skip("interpreter cases run on machines without a GPU "
                    "(DAAD_TRITON_INTERPRETER_TESTS=1 to run them here)")
    if _interpreted_here():
        return None
    try:
        return triton_runner.run_in_subprocess()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


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
            signature[name] = "fp32" if name in ("threshold", "temperature") else "i32"
    options = {"num_warps": config.num_warps if config else 4,
               "num_stages": config.num_stages if config else 2}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.metadata.shared <= H200_SMEM, (fn.__name__, config, compiled.metadata.shared)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_kernels_compile_for_sm90(dtype):
    mod = triton_package()
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
    # ELT=4: the backward's products with A run on float32 tiles. The dot similarity's grad_x
    # has no norm correction (corr is None).
    for cosine, need_gx, need_gm in ((True, True, True), (True, False, True), (True, True, False),
                                     (False, True, True)):
        _compile_sm90(fused.backward_kernel, io,
                      dict(HAS_GY=True, HAS_GW=True, COSINE=cosine, SHRINK=1, NEED_GX=need_gx,
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
    return triton_config(path, autotune=False)


def _check_half(dtype, path, shape, items, division, options):
    # A wide tie margin (half-rounded inputs must keep the float64 mask): temperatures high enough
    # that all weights stay within a factor of about 1.5 of 1/N, far above the threshold 0.2/N.
    options = dict(options, threshold=0.2 / items,
                   temperature=0.5 if options["similarity"] == "cosine" else 256.0)
    x, memory = tie_free_inputs(shape, items, division, dtype=dtype, device="cuda", margin=0.1,
                                **options)
    grads = loss_grads(x, division, items)
    got = run_launchers(_gpu_config(path), x, memory, division, *grads, **options)
    want = reference_grads(x, memory, division, *grads, **options)
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
    grads = loss_grads(x, GPU_DIVISION, GPU_ITEMS)
    first, second = (run_launchers(_gpu_config(path), x, memory, GPU_DIVISION, *grads,
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
    assert_launch_matches(triton_config("fused", autotune=True), x, memory, (2, 2, 1), atol=2e-5,
                          rtol=2e-4, **options)


@gpu
def test_gpu_opcheck():
    opcheck(torch.device("cuda"), torch.float32, shape=GPU_SHAPE, items=GPU_ITEMS,
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
