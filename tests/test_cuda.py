"""Tests of the ``"cuda"`` backend: the C++ op's CUDA kernels (csrc/cuda/).

Without a GPU (our machines and CI) these run:

* the CUDA kernels are registered whenever the extension was built with them (CI builds them with
  ``nvcc`` on every run; ``DAAD_EXT_EXPECT_CUDA=1`` makes a build without them a failure);
* the package imports and works on CPU when built with CUDA and no GPU is present;
* the warp-parallel form of the shared row epilogue (``row_forward_team`` / ``row_backward_team``
  of csrc/block_memory.h, which the CUDA kernels run with a warp as the team) against its serial
  form (which the CPU kernel runs), compiled with the host C++ compiler and run with 32 threads.

On a GPU (``test_gpu_*``, skipped otherwise): forward and backward against the float64 reference
in float32 (also with TF32), float16 and bfloat16, through y and/or w, every similarity and shrink,
shapes that exercise partial tiles, the split of the D loop and N > 1024; strided inputs; bitwise
determinism of grad M; ``opcheck``; ``torch.compile(fullgraph=True)`` of ``BlockMemory``; NaN
rows; empty batches; bad arguments to the op itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from daad_ext import BlockMemory, available_backends, block_memory, ops
from daad_ext.reference import block_memory_ref
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
    if os.environ.get("DAAD_EXT_EXPECT_CUDA") == "1":
        assert built, "DAAD_EXT_EXPECT_CUDA=1 but daad_ext._C was built without csrc/cuda"
    if not built:
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


# A C++ program that runs each row of random logits / gradients through the team-parallel
# epilogue with 32 std::threads as the team (a stand-in for the warp: each member owns items
# rank, rank + 32, ..., and sum/max gather all members' values) and through the serial form.
TEAM_CHECK_CPP = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>
#include "block_memory.h"
using namespace daad_ext;

constexpr int kLanes = 32;
struct Shared {
  std::barrier<> sync{kLanes};
  float slots[kLanes];
};
struct ThreadTeam {  // the loops of WarpTeam (csrc/cuda/common.cuh), over threads
  Shared* shared;
  int lane;
  template <typename Op>
  float combine(float v, Op op) const {
    shared->slots[lane] = v;
    shared->sync.arrive_and_wait();
    float r = shared->slots[0];
    for (int i = 1; i < kLanes; ++i) r = op(r, shared->slots[i]);
    shared->sync.arrive_and_wait();  // nobody overwrites a slot before everybody has read it
    return r;
  }
  template <typename F>
  void for_each(int n, F&& f) const {
    for (int i = lane; i < n; i += kLanes) f(i);
  }
  template <typename F>
  float sum(int n, F&& f) const {
    float acc = 0.f;
    for (int i = lane; i < n; i += kLanes) acc += f(i);
    return combine(acc, [](float a, float b) { return a + b; });
  }
  template <typename F>
  float max(int n, float init, F&& f) const {
    float acc = init;
    for (int i = lane; i < n; i += kLanes) {
      const float v = f(i);
      acc = v > acc ? v : acc;
    }
    return combine(acc, [](float a, float b) { return b > a ? b : a; });
  }
};

static bool close(float a, float b) { return std::fabs(a - b) <= 1e-5f + 1e-4f * std::fabs(b); }

int main() {
  std::mt19937 gen(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  int failures = 0, rows = 0;
  for (int n : {1, 5, 31, 32, 33, 100, 257}) {
    for (Shrink shrink : {Shrink::Hard, Shrink::MemAE, Shrink::None}) {
      for (int trial = 0; trial < 4; ++trial, ++rows) {
        const float lam = 1.f / n, temperature = 0.5f;
        std::vector<float> z(n), g(n);
        for (float& v : z) v = 2.f * normal(gen);
        for (float& v : g) v = normal(gen);
        // serial
        std::vector<float> zs = z, ws(n), ps(n), gs = g, prod_s(n);
        const float lse_s = row_forward(zs.data(), n, shrink, lam, ws.data(), ps.data());
        const float* p_s = shrink == Shrink::MemAE ? ps.data() : nullptr;
        const float dot_s = row_backward(gs.data(), ws.data(), p_s, n, shrink, lam, temperature,
                                         lse_s, prod_s.data());
        // team of 32 threads
        std::vector<float> zt = z, wt(n), pt(n), gt = g, prod_t(n);
        float lse_t[kLanes], dot_t[kLanes];
        Shared shared;
        std::vector<std::thread> lanes;
        for (int lane = 0; lane < kLanes; ++lane)
          lanes.emplace_back([&, lane] {
            const ThreadTeam team{&shared, lane};
            lse_t[lane] = row_forward_team(team, zt.data(), n, shrink, lam, wt.data(), pt.data());
            const float* p_t = shrink == Shrink::MemAE ? pt.data() : nullptr;
            dot_t[lane] = row_backward_team(team, gt.data(), static_cast<const float*>(wt.data()),
                                            p_t, n, shrink, lam, temperature, lse_t[lane],
                                            prod_t.data());
          });
        for (auto& t : lanes) t.join();
        bool ok = true;
        for (int lane = 0; lane < kLanes; ++lane)
          ok &= lse_t[lane] == lse_t[0] && dot_t[lane] == dot_t[0];
        ok &= close(lse_t[0], lse_s) && close(dot_t[0], dot_s);
        for (int i = 0; i < n; ++i)
          ok &= close(zt[i], zs[i]) && close(wt[i], ws[i]) && close(gt[i], gs[i]) &&
                close(prod_t[i], prod_s[i]) && ((wt[i] > 0) == (ws[i] > 0));
        if (!ok) {
          ++failures;
          std::printf("mismatch: n=%d shrink=%d trial=%d\n", n, int(shrink), trial);
        }
      }
    }
  }
  // A NaN logit makes the whole row NaN, in both forms and every shrink mode (as the reference).
  for (Shrink shrink : {Shrink::Hard, Shrink::MemAE, Shrink::None}) {
    const int n = 40;
    std::vector<float> zs(n, 0.5f), ws(n), zt(n, 0.5f), wt(n);
    zs[7] = zt[7] = NAN;
    row_forward(zs.data(), n, shrink, 0.1f, ws.data(), static_cast<float*>(nullptr));
    Shared shared;
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < kLanes; ++lane)
      lanes.emplace_back([&, lane] {
        row_forward_team(ThreadTeam{&shared, lane}, zt.data(), n, shrink, 0.1f, wt.data(),
                         static_cast<float*>(nullptr));
      });
    for (auto& t : lanes) t.join();
    for (int i = 0; i < n; ++i) {
      if (!std::isnan(ws[i]) || !std::isnan(wt[i])) {
        ++failures;
        std::printf("NaN row: shrink=%d item %d gives %g (serial), %g (team)\n", int(shrink), i,
                    ws[i], wt[i]);
        break;
      }
    }
  }
  std::printf("%d of %d rows differ\n", failures, rows);
  return failures != 0;
}
"""


def test_team_epilogue_matches_serial_epilogue():
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "team_check.cpp"), os.path.join(tmp, "team_check")
        with open(src, "w") as f:
            f.write(TEAM_CHECK_CPP)
        build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-I", os.path.join(ROOT, "csrc"),
                                src, "-o", exe], capture_output=True, text=True)
        if build.returncode != 0 and "barrier" in build.stderr:
            pytest.skip(f"host compiler lacks C++20 <barrier>: {build.stderr[-300:]}")
        assert build.returncode == 0, build.stderr
        run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------------------------
# On a GPU

#: Tolerances against the float64 reference. Half types store w, y and the gradients in 16 bits
#: (the reference itself run in bfloat16 is about 2e-2 off); the epilogue runs in float32.
TOLERANCES = {torch.float32: dict(atol=5e-5, rtol=5e-4),
              torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _temperature(similarity: str) -> float:
    # Spreads the softmax, so that few weights sit near the threshold.
    return 0.2 if similarity == "cosine" else 1.0


def _cuda_inputs(shape, num_items, division, similarity, shrink, dtype, seed=0, temperature=None,
                 threshold=None):
    """Tie-free inputs on the GPU; half types keep a 5% margin from the threshold."""
    temperature = _temperature(similarity) if temperature is None else temperature
    margin = None if dtype == torch.float32 else 0.05
    x, memory = tie_free_inputs(shape, num_items, division, similarity, shrink, threshold,
                                temperature, dtype=dtype, device="cuda", seed=seed, margin=margin)
    return x, memory, dict(division=division, similarity=similarity, shrink=shrink,
                           threshold=threshold, temperature=temperature)


@pytest.fixture
def no_tf32():
    """float32 products in full fp32 (PyTorch's default), whatever the session set."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@needs_gpu
@pytest.mark.parametrize("through", [("y", "w"), ("y",), ("w",)], ids="+".join)
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(dtype, similarity, shrink, through, no_tf32):
    if dtype == torch.float32:
        shape, num_items, division = (2, 8, 8, 8), 13, (2, 2, 2)
    else:  # a short D spreads the cosine similarities, so that a 5% margin is found
        shape, num_items, division = (2, 4, 4, 4), 11, (2, 2, 1)
    x, memory, options = _cuda_inputs(shape, num_items, division, similarity, shrink, dtype, seed=1)
    assert_matches_reference("cuda", x, memory, through=through, **options, **TOLERANCES[dtype])


# Shapes beyond one tile: B*Q > 64 rows, N > 128 items and N > 1024, D not a multiple of 32, D
# long enough that the similarity's D loop is split across CTAs, rc > 1.
SHAPES = [
    ((3, 6, 10, 14), 1500, (2, 7, 3), "cosine", "none"),
    ((5, 12, 9, 9), 130, (3, 3, 2), "dot", "memae"),
    ((4, 16, 16, 16), 70, (4, 4, 1), "cosine", "hard"),
    ((2, 64, 32, 32), 300, (4, 4, 1), "cosine", "none"),
    ((2, 64, 32, 32), 300, (4, 4, 1), "dot", "hard"),
    ((1, 3, 5, 7), 1, (1, 1, 1), "cosine", "none"),
]


@needs_gpu
@pytest.mark.parametrize("shape,num_items,division,similarity,shrink", SHAPES)
def test_gpu_shapes(shape, num_items, division, similarity, shrink, no_tf32):
    x, memory, options = _cuda_inputs(shape, num_items, division, similarity, shrink, torch.float32)
    assert_matches_reference("cuda", x, memory, **options, atol=1e-4, rtol=1e-3)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_daad_scale(dtype, no_tf32):
    """DAAD's scale 3 at batch 2 (D=4096, N=500, Q=64): forward and backward against float64."""
    x, memory, options = _cuda_inputs((2, 256, 32, 32), 500, (8, 8, 1), "cosine", "none", dtype,
                                      temperature=0.05)
    tol = dict(atol=2e-4, rtol=2e-3) if dtype == torch.float32 else TOLERANCES[dtype]
    assert_matches_reference("cuda", x, memory, **options, **tol)


@needs_gpu
def test_gpu_tf32(no_tf32):
    """With TF32 allowed, float32 products run on tensor cores with a TF32 tolerance."""
    torch.backends.cuda.matmul.allow_tf32 = True
    x, memory, options = _cuda_inputs((2, 4, 4, 4), 11, (2, 2, 1), "cosine", "hard", torch.float32,
                                      seed=1)
    assert_matches_reference("cuda", x, memory, **options, atol=1e-2, rtol=1e-2)


@needs_gpu
def test_gpu_strided_inputs(no_tf32):
    """channels_last and sliced inputs give the results of their contiguous copies, bit for bit."""
    x, memory, options = _cuda_inputs((2, 8, 8, 8), 13, (2, 2, 2), "cosine", "hard", torch.float32)
    want_y, want_w = block_memory(x, memory, backend="cuda", **options)
    for strided in (x.to(memory_format=torch.channels_last),
                    x.transpose(2, 3).contiguous().transpose(2, 3),
                    torch.cat([x, x], dim=3)[..., :8],
                    torch.cat([x, torch.zeros_like(x)], dim=1)[:, :8]):
        assert torch.equal(strided, x)
        assert not strided.is_contiguous()
        y, w = block_memory(strided, memory, backend="cuda", **options)
        assert torch.equal(y, want_y) and torch.equal(w, want_w)
        assert y.is_contiguous()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_deterministic(dtype, no_tf32):
    """Two runs give the same bits: no atomics anywhere, grad M included."""
    x, memory = torch.randn(4, 64, 32, 32, device="cuda", dtype=dtype), torch.randn(
        500, 64 * 4 * 4, device="cuda", dtype=dtype)

    def run():
        xx, mm = x.clone().requires_grad_(), memory.clone().requires_grad_()
        y, w = block_memory(xx, mm, (8, 8, 1), backend="cuda")
        (y.float().square().sum() + w.float().log1p().sum()).backward()
        return y, w, xx.grad, mm.grad

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_opcheck(dtype, shrink):
    x, memory, options = _cuda_inputs((2, 4, 4, 4), 11, (2, 2, 1), "cosine", shrink, dtype, seed=1)
    lam = 1.0 / memory.shape[0]
    args = (x.requires_grad_(), memory.requires_grad_(), 2, 2, 1, "cosine", shrink, lam,
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


@needs_gpu
def test_gpu_nan_rows():
    x, memory = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(10, 4 * 4 * 4, device="cuda")
    x[1, 0, 5, 6] = float("nan")  # in block ih=1, iw=1 (query 3) of image 1
    y, w = block_memory(x, memory, (2, 2, 1), backend="cuda")
    assert w[1, 3].isnan().all() and y[1, :, 4:, 4:].isnan().all()
    w[1, 3] = 0
    y[1, :, 4:, 4:] = 0
    assert w.isfinite().all() and y.isfinite().all()


@needs_gpu
def test_gpu_empty_batch():
    x = torch.randn(0, 4, 8, 8, device="cuda", requires_grad=True)
    memory = torch.randn(10, 4 * 4 * 4, device="cuda", requires_grad=True)
    y, w = block_memory(x, memory, (2, 2, 1), backend="cuda")
    assert y.shape == x.shape and w.shape == (0, 4, 10)
    (y.sum() + w.sum()).backward()
    assert x.grad is None or x.grad.shape == x.shape
    assert memory.grad is None or torch.equal(memory.grad, torch.zeros_like(memory))


@needs_gpu
def test_gpu_op_checks_its_arguments():
    """The C++ op checks what daad_ext/spec.py checks, for callers that bypass Python."""
    fwd = torch.ops.daad_ext.block_memory_forward
    x, memory = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(10, 64, device="cuda")
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
    x, memory, options = _cuda_inputs((3, 8, 16, 16), 70, (2, 2, 2), similarity, shrink,
                                      torch.float32)

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
