"""The fused CPU kernel (csrc/block_memory_cpu.cpp) against the reference: forward and backward on
randomised shapes and layouts, gradcheck, opcheck, torch.compile, bad input, NaN, zero blocks, the
chunked paths, determinism, and the CMake build with its ctest; the bfloat16 path against the
float64 reference with the GPU kernels' bfloat16 tolerances, and opcheck."""
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from daad_ext import BlockMemory, block_memory, ops
from daad_ext.reference import block_memory_ref
from helpers import assert_matches_reference, tie_free_inputs

pytestmark = pytest.mark.skipif(
    "cpu" not in ops.KERNEL_DEVICES,
    reason="daad_ext._C was built without the CPU kernel (or not built): "
           "pip install --no-build-isolation -e .")

SHRINKS = ("hard", "memae", "none")
SIMILARITIES = ("cosine", "dot")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: bfloat16 stores x, M, y, w and the gradients in 8 bits of mantissa (the epilogue runs in float32):
#: the tolerance of the GPU kernels' bfloat16 tests (tests/test_cuda.py), with their 5% margin of the
#: float64 weights from the threshold.
BF16_TOLERANCE = dict(atol=5e-2, rtol=5e-2)
BF16_MARGIN = 0.05


def tolerances(dtype, similarity="cosine"):
    if dtype == torch.float64:
        return dict(atol=1e-9, rtol=1e-8)
    if dtype == torch.bfloat16:
        return BF16_TOLERANCE
    # Dot similarities of unnormalised blocks give large logits; the float32 reference itself is
    # off by about 1e-5 there.
    return dict(atol=5e-5 if similarity == "dot" else 1e-5, rtol=1e-4)


def random_cases(count, seed):
    """Random (shape, N, division, similarity, shrink, threshold, temperature, layout, through),
    redrawn until tie-free inputs exist for it (see helpers.tie_free_inputs)."""
    rng = random.Random(seed)
    divisions = [(2, 2, 1), (4, 2, 2), (1, 1, 2), (2, 4, 3), (4, 4, 1), (8, 8, 1)]
    cases = []
    i = 0
    while len(cases) < count:
        rh, rw, rc = divisions[i % len(divisions)]
        bc, bh, bw = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 4, 5])
        shape = (rng.choice([1, 2, 3, 5]), bc * rc, bh * rh, bw * rw)
        similarity = SIMILARITIES[i % 2]
        # Dot logits are unnormalised: a low temperature makes rows so peaked that near-ties of
        # the two largest weights (which decide the hard mask) are everywhere.
        temperature = rng.choice([1.0, 2.0] if similarity == "dot" else [1.0, 0.5, 2.0])
        case = (shape, rng.choice([1, 7, 19, 50]), (rh, rw, rc), similarity, SHRINKS[i % 3],
                rng.choice([None, None, 0.03]), temperature,
                rng.choice(["contiguous", "channels_last", "strided"]),
                [("y", "w"), ("y",), ("w",)][(i // 3) % 3])
        i += 1
        try:
            for dtype in (torch.float32, torch.float64):
                _inputs(case, dtype)
        except RuntimeError:
            continue
        cases.append(case)
    return cases


def _inputs(case, dtype):
    shape, n, division, similarity, shrink, threshold, temperature, layout, _ = case
    x, memory = tie_free_inputs(shape, n, division, similarity, shrink, threshold, temperature,
                                dtype=dtype, seed=sum(shape) + n)
    return with_layout(x, layout), memory


def with_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a twice as wide tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", random_cases(24, seed=3),
                         ids=lambda c: "-".join(map(str, c[:5] + c[7:8])).replace(" ", ""))
def test_matches_reference(case, dtype):
    shape, n, division, similarity, shrink, threshold, temperature, layout, through = case
    x, memory = _inputs(case, dtype)
    assert_matches_reference("cpu", x, memory, division, similarity, shrink, threshold,
                             temperature, through=through, **tolerances(dtype, similarity))


@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_all_options_float32(similarity, shrink):
    division = (2, 4, 2)
    x, memory = tie_free_inputs((3, 6, 8, 12), 23, division, similarity, shrink, 0.02, 0.7, seed=1)
    assert_matches_reference("cpu", x, memory, division, similarity, shrink, 0.02, 0.7,
                             **tolerances(torch.float32, similarity))


@pytest.mark.parametrize("through", [("y", "w"), ("y",), ("w",)], ids="+".join)
@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_bfloat16_matches_reference(similarity, shrink, through):
    """As the GPU kernels' bf16 test: a short D spreads the similarities, so that inputs with a 5%
    margin from the threshold are found."""
    division, temperature = (2, 2, 1), 0.2 if similarity == "cosine" else 1.0
    x, memory = tie_free_inputs((2, 4, 4, 4), 11, division, similarity, shrink, None, temperature,
                                dtype=torch.bfloat16, seed=1, margin=BF16_MARGIN)
    assert_matches_reference("cpu", x, memory, division, similarity, shrink, None, temperature,
                             through=through, **BF16_TOLERANCE)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_bfloat16_layouts(layout):
    division = (2, 2, 1)
    x, memory = tie_free_inputs((2, 4, 4, 4), 11, division, "cosine", "memae", None, 0.2,
                                dtype=torch.bfloat16, seed=1, margin=BF16_MARGIN)
    assert_matches_reference("cpu", with_layout(x, layout), memory, division, "cosine", "memae",
                             None, 0.2, **BF16_TOLERANCE)


def test_bfloat16_daad_scale():
    """A DAAD-like geometry (8x8 blocks of 2048 values, N=500): the similarities are products over
    whole rows. No shrinkage: at N = 500, bf16 inputs put some weight near any threshold."""
    division = (8, 8, 1)
    x, memory = tie_free_inputs((2, 32, 64, 64), 500, division, "cosine", "none", None, 0.05,
                                dtype=torch.bfloat16, seed=5)
    assert_matches_reference("cpu", x, memory, division, "cosine", "none", None, 0.05,
                             **BF16_TOLERANCE)


@pytest.mark.parametrize("chunk_bytes,row_bytes", [("4096", "4096"), ("65536", "1")])
@pytest.mark.parametrize("similarity,shrink", [("cosine", "hard"), ("dot", "memae"), ("cosine", "none")])
def test_chunked_paths(monkeypatch, similarity, shrink, chunk_bytes, row_bytes):
    """Several column chunks and several row blocks (the default sizes use one row block here)."""
    monkeypatch.setenv("DAAD_EXT_CPU_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setenv("DAAD_EXT_CPU_ROW_BLOCK_BYTES", row_bytes)
    for shape, division in (((5, 8, 32, 32), (2, 2, 1)),    # D = 2048: up to 8 column chunks
                            ((5, 4, 16, 16), (8, 8, 1))):   # 320 rows: two row blocks of 160
        d = shape[1] * shape[2] * shape[3] // (division[0] * division[1])
        temperature = d ** 0.5 if similarity == "dot" else 1.0  # moderate dot logits
        x, memory = tie_free_inputs(shape, 13, division, similarity, shrink, None, temperature,
                                    seed=2)
        assert_matches_reference("cpu", x, memory, division, similarity, shrink, None, temperature,
                                 **tolerances(torch.float32, similarity))


#: (shape, N, division, similarity, shrink, temperature, chunk bytes, row-block bytes)
BF16_CHUNKED = [
    # D = 2048 in 8 column chunks (y, grad x, grad M per chunk; S and G over whole rows)
    ((5, 8, 32, 32), 5, (2, 2, 1), "cosine", "hard", 0.02, "4096", "4096"),
    ((5, 8, 32, 32), 5, (2, 2, 1), "dot", "memae", 2048 ** 0.5 / 4, "4096", "4096"),
    # 320 rows in two row blocks of 160 (grad M summed over them); at this many rows some weight
    # is near any threshold in bfloat16, so without shrinkage
    ((5, 4, 16, 16), 13, (8, 8, 1), "cosine", "none", 0.2, "65536", "1"),
    ((5, 4, 16, 16), 13, (8, 8, 1), "dot", "none", 4.0, "65536", "1"),
]


@pytest.mark.parametrize("case", BF16_CHUNKED, ids=lambda c: f"{c[3]}-{c[4]}-{c[6]}-{c[7]}")
def test_bfloat16_chunked_paths(monkeypatch, case):
    shape, n, division, similarity, shrink, temperature, chunk_bytes, row_bytes = case
    monkeypatch.setenv("DAAD_EXT_CPU_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setenv("DAAD_EXT_CPU_ROW_BLOCK_BYTES", row_bytes)
    x, memory = tie_free_inputs(shape, n, division, similarity, shrink, None, temperature,
                                dtype=torch.bfloat16, seed=2, margin=BF16_MARGIN)
    assert_matches_reference("cpu", x, memory, division, similarity, shrink, None, temperature,
                             **BF16_TOLERANCE)


def test_daad_scale_float32():
    """A DAAD-like geometry (8x8 blocks of 2048 values, N=500) with the default chunking."""
    division = (8, 8, 1)
    x, memory = tie_free_inputs((2, 32, 64, 64), 500, division, temperature=0.1, seed=5,
                                margin=1e-5)
    assert_matches_reference("cpu", x, memory, division, temperature=0.1, atol=2e-5, rtol=1e-4)


def test_expanded_grad_y_and_grad_w():
    """y.sum() gives a stride-0 grad_y; w's gradient from an entropy term; both at once."""
    division = (2, 2, 1)
    x, memory = tie_free_inputs((2, 4, 8, 8), 9, division, shrink="memae", seed=6)
    grads = []
    for backend in ("cpu", "reference"):
        xg, mg = x.clone().requires_grad_(), memory.clone().requires_grad_()
        y, w = block_memory(xg, mg, division, shrink="memae", backend=backend)
        (y.sum() - (w * (w + 1e-12).log()).sum()).backward()
        grads.append((xg.grad, mg.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("through", ["y", "w"])
@pytest.mark.parametrize("similarity,shrink,temperature", [
    ("cosine", "hard", 1.0), ("cosine", "memae", 0.5), ("cosine", "none", 2.0),
    ("dot", "hard", 1.0), ("dot", "memae", 1.0), ("dot", "none", 0.5)])
def test_gradcheck(similarity, shrink, temperature, through):
    division = (2, 2, 2)
    threshold = 0.05 if shrink != "none" else None
    x, memory = tie_free_inputs((2, 4, 4, 4), 7, division, similarity, shrink, threshold,
                                temperature, dtype=torch.float64, seed=7, margin=1e-2)
    index = 0 if through == "y" else 1

    def fn(x, memory):
        return block_memory(x, memory, division, similarity, shrink, threshold, temperature,
                            backend="cpu")[index]

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), memory.requires_grad_()),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def _op_args(shrink="hard", requires_grad=False, similarity="cosine", dtype=torch.float32):
    x, memory = tie_free_inputs((2, 4, 8, 8), 9, (2, 2, 1), similarity, shrink, dtype=dtype,
                                seed=8)
    return (x.requires_grad_(requires_grad), memory.requires_grad_(requires_grad), 2, 2, 1,
            similarity, shrink, 1.0 / 9, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shrink,similarity", [("hard", "cosine"), ("memae", "dot"), ("none", "cosine")])
def test_opcheck_forward(shrink, similarity, requires_grad, dtype):
    torch.library.opcheck(torch.ops.daad_ext.block_memory_forward.default,
                          _op_args(shrink, requires_grad, similarity, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_item_norms_are_the_norms_of_the_memory_items(dtype):
    """The forward's item_norms (|m_i|, computed in the kernel from M's own dtype) against float64
    norms of the same values; D = 4 * 4 * 7 = 112 leaves a tail after the 16-lane sums."""
    x = torch.randn(2, 7, 8, 8).to(dtype)
    memory = (torch.randn(5, 112) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0])[:, None]).to(dtype)
    *_, item_norms = torch.ops.daad_ext.block_memory_forward(x, memory, 2, 2, 1, "cosine", "hard",
                                                             0.2, 1.0)
    expected = torch.linalg.vector_norm(memory.double(), dim=1)
    torch.testing.assert_close(item_norms.double(), expected, rtol=1e-6 if dtype != torch.float64 else 1e-13,
                               atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shrink,similarity", [("memae", "cosine"), ("hard", "dot")])
def test_opcheck_backward(shrink, similarity, dtype):
    args = _op_args(shrink, similarity=similarity, dtype=dtype)
    y, w, probs, row_stats, item_norms = torch.ops.daad_ext.block_memory_forward(*args)
    assert y.dtype == w.dtype == dtype
    assert row_stats.dtype == item_norms.dtype == (torch.float64 if dtype == torch.float64
                                                   else torch.float32)
    x, memory, *options = args
    for grad_y, grad_w in ((torch.randn_like(y), None), (None, torch.randn_like(w)),
                           (torch.randn_like(y), torch.randn_like(w))):
        for needs in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.daad_ext.block_memory_backward.default,
                                  (grad_y, grad_w, x, memory, w, probs, row_stats, item_norms,
                                   *options, *needs))


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.memory = BlockMemory(8, 16, 16, num_items=20, division=(4, 4, 1), backend="cpu")
        self.dec = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y, w = self.memory(torch.relu(self.enc(x)), return_weights=True)
        return self.dec(y), w


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _TinyModel()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True)
    outs, grads = [], []
    for fn in (model, compiled):
        model.zero_grad()
        out, w = fn(x)
        (out.square().mean() + w.square().mean()).backward()
        outs.append((out.detach(), w.detach()))
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def _bad_op_calls():
    x, m = torch.randn(2, 4, 8, 8), torch.randn(5, 4 * 4 * 4)
    ok = (2, 2, 1, "cosine", "hard", 0.2, 1.0)
    return [
        ("x 3-D", (x[0], m, *ok), "4-D"),
        ("memory 1-D", (x, m[0], *ok), "2-D"),
        ("int x", (x.int(), m.int(), *ok), "floating-point"),
        ("dtype mismatch", (x, m.double(), *ok), "same dtype"),
        ("float16", (x.half(), m.half(), *ok), "float32, float64 and bfloat16"),
        ("H not divisible", (x, m, 3, 2, 1, "cosine", "hard", 0.2, 1.0), "not divisible"),
        ("C not divisible", (x, torch.randn(5, 64 // 3), 2, 2, 3, "cosine", "hard", 0.2, 1.0),
         "not divisible"),
        ("rate 0", (x, m, 0, 2, 1, "cosine", "hard", 0.2, 1.0), ">= 1"),
        ("D mismatch", (x, torch.randn(5, 63), *ok), "item length"),
        ("N = 0", (x, torch.randn(0, 64), *ok), "at least one item"),
        ("similarity", (x, m, 2, 2, 1, "cos", "hard", 0.2, 1.0), "unknown similarity"),
        ("shrink", (x, m, 2, 2, 1, "cosine", "soft", 0.2, 1.0), "unknown shrink"),
        ("threshold 0", (x, m, 2, 2, 1, "cosine", "hard", 0.0, 1.0), "threshold"),
        ("threshold > 1", (x, m, 2, 2, 1, "cosine", "hard", 1.5, 1.0), "threshold"),
        ("temperature 0", (x, m, 2, 2, 1, "cosine", "hard", 0.2, 0.0), "temperature"),
        ("temperature < 0", (x, m, 2, 2, 1, "cosine", "hard", 0.2, -1.0), "temperature"),
    ]


@pytest.mark.parametrize("name,args,message", _bad_op_calls(), ids=[c[0] for c in _bad_op_calls()])
def test_bad_op_call_raises(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.daad_ext.block_memory_forward(*args)


def test_bad_backward_call_raises():
    args = _op_args()
    y, w, probs, row_stats, item_norms = torch.ops.daad_ext.block_memory_forward(*args)
    x, memory, *options = args
    bad = [
        ((y[:1], None, x, memory, w, probs, row_stats, item_norms), "grad_y"),
        ((None, w[:, :1], x, memory, w, probs, row_stats, item_norms), "grad_w"),
        ((y, None, x, memory, w[:1], probs, row_stats, item_norms), "w must have shape"),
        ((y, None, x, memory, w, probs, row_stats[..., :1], item_norms), "row_stats"),
        ((y, None, x, memory, w, probs, row_stats, item_norms[:2]), "item_norms"),
        ((y.double(), None, x, memory, w, probs, row_stats, item_norms), "dtype"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.daad_ext.block_memory_backward(*call, *options, True, True)
    with pytest.raises(RuntimeError, match="probs"):  # MemAE needs the saved softmax
        torch.ops.daad_ext.block_memory_backward(y, None, x, memory, w, probs, row_stats,
                                                 item_norms, 2, 2, 1, "cosine", "memae", 0.1, 1.0,
                                                 True, True)


def test_bad_input_through_block_memory():
    x, m = torch.randn(2, 4, 8, 8), torch.randn(5, 64)
    with pytest.raises(ValueError, match="not divisible"):
        block_memory(x, m, (3, 2, 1), backend="cpu")
    with pytest.raises(TypeError, match="same dtype"):
        block_memory(x, m.double(), (2, 2, 1), backend="cpu")
    with pytest.raises(ValueError, match="not available"):
        block_memory(x.half(), m.half(), (2, 2, 1), backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shrink", SHRINKS)
def test_nan_rows(shrink, dtype):
    division = (2, 2, 1)
    x, memory = tie_free_inputs((2, 4, 8, 8), 9, division, shrink=shrink, dtype=dtype, seed=9)
    x[1, 0, 5, 6] = float("nan")  # image 1, query (ih, iw) = (1, 1) -> k = 3
    x.requires_grad_()
    y, w = block_memory(x, memory, division, shrink=shrink, backend="cpu")
    assert torch.isnan(w[1, 3]).all() and torch.isnan(y[1, :, 4:, 4:]).all()
    rest = torch.ones(2, 4, dtype=torch.bool)
    rest[1, 3] = False
    assert torch.isfinite(w[rest]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :, :4]).all()
    y.sum().backward()  # no crash; NaN flows only where the NaN row reaches
    assert torch.isfinite(x.grad[0]).all()


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_zero_block(similarity):
    division = (2, 2, 1)
    x, memory = tie_free_inputs((2, 4, 8, 8), 9, division, similarity, "none", seed=10)
    x[0, :, :4, 4:] = 0
    y, w = block_memory(x, memory, division, similarity, "none", backend="cpu")
    y_ref, w_ref = block_memory_ref(x.double(), memory.double(), division, similarity, "none")
    torch.testing.assert_close(w.double(), w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_()
    block_memory(xg, memory, division, similarity, "hard", threshold=0.5 / 9,
                 backend="cpu")[0].sum().backward()
    assert torch.isfinite(xg.grad[0, :, 4:]).all() and torch.isfinite(xg.grad[1]).all()


def test_bfloat16_zero_block_and_item_stay_finite():
    """The 1e-12 floors are applied in float32: an all-zero block, a zero memory item and a MemAE
    row with nothing kept give finite values and gradients in bfloat16, not NaN."""
    x, memory = torch.randn(2, 4, 4, 4), torch.randn(6, 16)
    x[0, :, :2, :2] = 0
    memory[2] = 0
    for shrink, threshold in (("hard", None), ("memae", None), ("memae", 1.0), ("none", None)):
        xb = x.bfloat16().requires_grad_()
        mb = memory.bfloat16().requires_grad_()
        y, w = block_memory(xb, mb, (2, 2, 1), shrink=shrink, threshold=threshold, backend="cpu")
        (y.float().sum() + w.float().sum()).backward()
        for t in (y, w, xb.grad, mb.grad):
            assert torch.isfinite(t).all(), (shrink, threshold)
        if threshold == 1.0:
            assert (w == 0).all()  # nothing passes a threshold of 1: zero rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_backward(dtype):
    division = (8, 8, 1)
    gen = torch.Generator().manual_seed(11)
    x, memory = torch.randn(4, 8, 32, 32, generator=gen), torch.randn(50, 128, generator=gen)
    gy = torch.randn(x.shape, generator=gen)
    x, memory, gy = x.to(dtype), memory.to(dtype), gy.to(dtype)
    results = []
    for _ in range(2):
        xg, mg = x.clone().requires_grad_(), memory.clone().requires_grad_()
        block_memory(xg, mg, division, backend="cpu")[0].backward(gy)
        results.append((xg.grad, mg.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_auto_backend_is_cpu():
    from daad_ext import available_backends
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert available_backends("cpu", dtype)[0] == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_batch(dtype):
    x, m = torch.randn(0, 4, 8, 8, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    y, w = block_memory(x, m, (2, 2, 1), backend="cpu")
    assert y.shape == x.shape and w.shape == (0, 4, 5) and y.dtype == w.dtype == dtype
    item_norms = torch.ops.daad_ext.block_memory_forward(x, m, 2, 2, 1, "cosine", "hard", 0.2,
                                                         1.0)[4]
    torch.testing.assert_close(item_norms, m.float().norm(dim=1))


@pytest.mark.cmake
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    """CMakeLists.txt builds the op against LibTorch and its C++ test passes (ctest)."""
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True, env=env)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True,
                   env=env)
    result = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
