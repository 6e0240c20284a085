"""The reference operator against an independent naive float64 implementation, gradcheck, properties,
and the ``BlockMemory`` layer's contract (shape, state, compile, bad input)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from daad_ext import BlockMemory, available_backends, block_memory, block_memory_ref
from daad_ext.reference import assemble_blocks, divide_blocks
from daad_ext.spec import make_division
from helpers import (ZERO_ITEM, forward_backward, near_tie_rows, output_path_grad,
                     tie_free_inputs, zero_block_grads, zero_rows)

SHRINKS = ("hard", "memae", "none")
SIMILARITIES = ("cosine", "dot")


def naive_block_memory(x, memory, division, similarity, shrink, threshold, temperature):
    """Loops over images, blocks and items, slicing blocks out of x: shares no code with the reference."""
    b_, c, h, w_ = x.shape
    rh, rw, rc = division
    bc, bh, bw = c // rc, h // rh, w_ // rw
    n = memory.shape[0]
    threshold = 1.0 / n if threshold is None else threshold
    y = torch.zeros_like(x, dtype=torch.float64)
    weights = torch.zeros(b_, rh * rw * rc, n, dtype=torch.float64)
    for b in range(b_):
        for ic in range(rc):
            for ih in range(rh):
                for iw in range(rw):
                    k = (ic * rh + ih) * rw + iw
                    sl = (b, slice(ic * bc, (ic + 1) * bc), slice(ih * bh, (ih + 1) * bh),
                          slice(iw * bw, (iw + 1) * bw))
                    q = x[sl].double().flatten()
                    s = []
                    for i in range(n):
                        m = memory[i].double()
                        dot = float((q * m).sum())
                        if similarity == "cosine":
                            dot /= max(math.sqrt(float((q * q).sum())), 1e-12) * \
                                max(math.sqrt(float((m * m).sum())), 1e-12)
                        s.append(dot / temperature)
                    top = max(s)
                    e = [math.exp(v - top) for v in s]
                    p = [v / sum(e) for v in e]
                    if shrink == "hard":
                        u = [pi if (pi >= threshold or pi == max(p)) else 0.0 for pi in p]
                    elif shrink == "memae":
                        u = [max(pi - threshold, 0.0) * pi / (abs(pi - threshold) + 1e-12) for pi in p]
                    else:
                        u = p
                    total = sum(u) if shrink == "hard" else max(sum(u), 1e-12) if shrink == "memae" else 1.0
                    wk = [ui / total for ui in u]
                    weights[b, k] = torch.tensor(wk, dtype=torch.float64)
                    block = sum(wi * memory[i].double() for i, wi in enumerate(wk))
                    y[sl] = block.reshape(bc, bh, bw)
    return y, weights


CASES = [  # (shape, N, division, similarity, shrink, threshold, temperature)
    ((2, 4, 8, 8), 10, (2, 2, 1), "cosine", "hard", None, 1.0),
    ((1, 6, 6, 4), 7, (3, 2, 3), "cosine", "memae", None, 0.1),
    ((3, 4, 4, 4), 13, (1, 1, 2), "dot", "hard", 0.05, 3.0),
    ((2, 2, 4, 6), 9, (4, 6, 1), "dot", "memae", 0.0025, 1.0),
    ((2, 8, 4, 4), 5, (2, 2, 4), "cosine", "none", None, 0.5),
    ((1, 3, 5, 5), 11, (5, 5, 3), "dot", "none", None, 2.0),
    ((2, 4, 8, 8), 6, (4, 4, 2), "cosine", "hard", 0.4, 0.2),
]


@pytest.mark.parametrize("shape,n,division,similarity,shrink,threshold,temperature", CASES)
def test_reference_matches_naive_float64(shape, n, division, similarity, shrink, threshold, temperature):
    x, memory = tie_free_inputs(shape, n, division, similarity, shrink, threshold, temperature,
                                dtype=torch.float64)
    y, w = block_memory_ref(x, memory, division, similarity, shrink, threshold, temperature)
    y_naive, w_naive = naive_block_memory(x, memory, division, similarity, shrink, threshold,
                                          temperature)
    torch.testing.assert_close(w, w_naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("through", ["y", "w"])
@pytest.mark.parametrize("shape,n,division,similarity,shrink,threshold,temperature", CASES[:5])
def test_reference_gradcheck(shape, n, division, similarity, shrink, threshold, temperature, through):
    x, memory = tie_free_inputs(shape, n, division, similarity, shrink, threshold, temperature,
                                dtype=torch.float64, margin=1e-3)
    x.requires_grad_()
    memory.requires_grad_()

    def read(x, memory):
        y, w = block_memory_ref(x, memory, division, similarity, shrink, threshold, temperature)
        return y if through == "y" else w

    assert torch.autograd.gradcheck(read, (x, memory), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# All-zero blocks and an all-zero item under cosine (tests/helpers.py's zero_rows): no gradient
# flows through the similarity to them, so a zero block's gradient is 0 and a zero item's is its
# gradient through y alone, finite and the same in every dtype. The backends: test_zero_blocks.py.

ZERO_SHAPE, ZERO_ITEMS, ZERO_DIVISION, ZERO_TEMPERATURE = (2, 4, 4, 4), 7, (2, 2, 1), 0.2
#: Thresholds below 1/N: a zero block's uniform weights (1/N each) keep a margin from them.
ZERO_SHRINKS = (("hard", 0.5 / ZERO_ITEMS), ("memae", 0.5 / ZERO_ITEMS), ("none", None))
#: Tolerances of the reference in each dtype against itself in float64 (half types: results
#: rounded to 16 bits).
DTYPE_TOLERANCES = {torch.float16: dict(atol=1e-2, rtol=1e-2),
                    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
                    torch.float32: dict(atol=5e-5, rtol=5e-4),
                    torch.float64: dict(atol=1e-12, rtol=1e-10)}


def _zero_row_inputs(shrink, threshold, dtype, margin):
    options = dict(division=ZERO_DIVISION, similarity="cosine", shrink=shrink,
                   threshold=threshold, temperature=ZERO_TEMPERATURE)
    x, memory = tie_free_inputs(ZERO_SHAPE, ZERO_ITEMS, ZERO_DIVISION, "cosine", shrink, threshold,
                                ZERO_TEMPERATURE, dtype=dtype, margin=margin,
                                transform=zero_rows(ZERO_DIVISION))
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(ZERO_SHAPE, generator=gen, dtype=torch.float64).to(dtype)
    grad_w = torch.randn(ZERO_SHAPE[0], math.prod(ZERO_DIVISION), ZERO_ITEMS, generator=gen,
                         dtype=torch.float64).to(dtype)
    return x, memory, grad_y, grad_w, options


@pytest.mark.parametrize("shrink,threshold", ZERO_SHRINKS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES), ids=str)
def test_zero_block_and_item_gradients_in_every_dtype(dtype, shrink, threshold):
    tolerance = DTYPE_TOLERANCES[dtype]
    half = dtype in (torch.float16, torch.bfloat16)
    x, memory, grad_y, grad_w, options = _zero_row_inputs(shrink, threshold, dtype,
                                                          margin=0.05 if half else 1e-3)
    got = forward_backward("reference", x, memory, grad_y, grad_w, options)
    for name, value in zip(("y", "w", "grad x", "grad memory"), got):
        assert value.dtype == dtype and torch.isfinite(value).all(), name
    _, w, grad_x, grad_memory = got
    for block in zero_block_grads(grad_x, ZERO_DIVISION):
        assert (block == 0).all()
    torch.testing.assert_close(grad_memory[ZERO_ITEM].double(),
                               output_path_grad(w, grad_y, ZERO_DIVISION)[ZERO_ITEM], **tolerance)
    want = forward_backward("reference", x.double(), memory.double(), grad_y.double(),
                            grad_w.double(), options)
    for name, g, r in zip(("y", "w", "grad x", "grad memory"), got, want):
        torch.testing.assert_close(g.double(), r, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def central_differences(loss, t: torch.Tensor, where: torch.Tensor,
                        h: float = 1e-6) -> torch.Tensor:
    """d loss() / d t by central differences at the entries of (contiguous) ``t`` where ``where``
    is true; 0 elsewhere. ``loss`` reads ``t``, which is perturbed in place and restored."""
    grad = torch.zeros_like(t)
    flat, grad_flat = t.view(-1), grad.view(-1)
    for j in where.view(-1).nonzero().flatten().tolist():
        value = float(flat[j])
        flat[j] = value + h
        up = loss()
        flat[j] = value - h
        down = loss()
        flat[j] = value
        grad_flat[j] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("through", [("y", "w"), ("w",)], ids="+".join)
@pytest.mark.parametrize("shrink,threshold", ZERO_SHRINKS)
def test_zero_block_and_item_gradients_float64(shrink, threshold, through):
    # Elsewhere the gradient is the derivative, checked by central differences of the naive
    # implementation; on the zero rows it is the rule (0 for a block, the y path for the item).
    x, memory, grad_y, grad_w, options = _zero_row_inputs(shrink, threshold, torch.float64, 1e-3)
    grad_y = grad_y if "y" in through else torch.zeros_like(grad_y)
    _, w, grad_x, grad_memory = forward_backward("reference", x, memory, grad_y, grad_w, options)

    def loss():
        y, w = naive_block_memory(x, memory, ZERO_DIVISION, "cosine", shrink, threshold,
                                  ZERO_TEMPERATURE)
        return float((y * grad_y).sum() + (w * grad_w).sum())

    nonzero_x, nonzero_memory = torch.ones_like(x), torch.ones_like(memory)
    zero_rows(ZERO_DIVISION)(nonzero_x, nonzero_memory)
    want_x = central_differences(loss, x, nonzero_x.bool())          # 0 on the zero blocks
    want_memory = central_differences(loss, memory, nonzero_memory.bool())
    want_memory[ZERO_ITEM] = output_path_grad(w, grad_y, ZERO_DIVISION)[ZERO_ITEM]
    torch.testing.assert_close(grad_x, want_x, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grad_memory, want_memory, atol=1e-6, rtol=1e-4)
    assert all((block == 0).all() for block in zero_block_grads(grad_x, ZERO_DIVISION))


def test_tie_margin_detects_a_constructed_tie():
    # Two identical items and one other: with the threshold set to their exact weight, every row ties.
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    memory = torch.randn(3, 8, dtype=torch.float64)
    memory[1] = memory[0]
    _, w = block_memory_ref(x, memory, (1, 1, 1), shrink="none")
    assert near_tie_rows(x, memory, (1, 1, 1), "cosine", "hard", float(w[0, 0, 0]), 1.0, 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), rates=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
       blocks=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
def test_division_then_assembly_is_identity(b, rates, blocks):
    (rh, rw, rc), (bh, bw, bc) = rates, blocks
    x = torch.randn(b, rc * bc, rh * bh, rw * bw)
    geometry = make_division(rc * bc, rh * bh, rw * bw, (rh, rw, rc))
    queries = divide_blocks(x, geometry)
    assert queries.shape == (b, rh * rw * rc, bc * bh * bw)
    # Query k = (ic*rh + ih)*rw + iw is the block at (ic, ih, iw), flattened in (c, y, x) order.
    ic, ih, iw = rc - 1, rh - 1, 0
    block = x[0, ic * bc:(ic + 1) * bc, ih * bh:(ih + 1) * bh, iw * bw:(iw + 1) * bw]
    torch.testing.assert_close(queries[0, (ic * rh + ih) * rw + iw], block.flatten())
    torch.testing.assert_close(assemble_blocks(queries, geometry), x, rtol=0, atol=0)


@pytest.mark.parametrize("shrink", SHRINKS)
@pytest.mark.parametrize("threshold", [None, 0.02, 1.0])
def test_weights_are_a_distribution_with_a_kept_item(shrink, threshold):
    x, memory = torch.randn(2, 8, 8, 8), torch.randn(40, 16)
    _, w = block_memory_ref(x, memory, (4, 4, 2), shrink=shrink, threshold=threshold, temperature=0.1)
    assert (w >= 0).all()
    if shrink == "memae" and threshold == 1.0:
        assert (w == 0).all()  # MemAE shrinks every weight below 1 to zero, by definition
        return
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 32))
    assert ((w > 0).sum(-1) >= 1).all()
    if shrink == "hard" and threshold == 1.0:
        assert ((w > 0).sum(-1) == 1).all()  # only the row maximum survives


def test_memae_configuration_is_memae_memory_module():
    """division (H, W, 1), dot, memae, 0.0025 reads each pixel's C-vector as in MemAE's code."""
    x, memory = torch.randn(2, 16, 4, 4, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    y, w = block_memory_ref(x, memory, (4, 4, 1), "dot", "memae", 0.0025)
    queries = x.permute(0, 2, 3, 1).reshape(-1, 16)           # MemAE: one query per pixel
    att = torch.softmax(queries @ memory.t(), dim=1)
    att = torch.relu(att - 0.0025) * att / (torch.abs(att - 0.0025) + 1e-12)
    att = torch.nn.functional.normalize(att, p=1, dim=1)
    out = (att @ memory).reshape(2, 4, 4, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(w.reshape(-1, 30), att)
    torch.testing.assert_close(y, out)


def test_zero_block_and_nan_rows():
    x, memory = torch.randn(1, 4, 4, 4), torch.randn(6, 16)
    x[0, :, :2, :2] = 0.0                      # block 0 all zero: valid under cosine
    x[0, 0, 3, 3] = float("nan")               # touches block 3 only
    for backend in available_backends("cpu"):
        y, w = block_memory(x, memory, (2, 2, 1), backend=backend)
        assert torch.isfinite(w[0, :3]).all() and torch.isnan(w[0, 3]).all(), backend
        blocks = divide_blocks(y, make_division(4, 4, 4, (2, 2, 1)))
        assert torch.isfinite(blocks[0, :3]).all() and torch.isnan(blocks[0, 3]).all(), backend


def test_non_contiguous_and_channels_last_inputs():
    x, memory = torch.randn(2, 8, 8, 8), torch.randn(12, 16)
    y, w = block_memory_ref(x, memory, (4, 4, 2))
    for variant in (x.to(memory_format=torch.channels_last),
                    torch.randn(2, 8, 8, 16)[..., ::2].copy_(x)):
        for backend in available_backends("cpu"):
            yv, wv = block_memory(variant, memory, (4, 4, 2), backend=backend)
            torch.testing.assert_close(yv, y)
            torch.testing.assert_close(wv, w)


# ----------------------------------------------------------------------------- the layer


def test_layer_parameter_state_and_weights():
    layer = BlockMemory(channels=8, height=16, width=16, num_items=50, division=(4, 4, 2))
    assert layer.memory.shape == (50, 4 * 4 * 4)
    bound = 1 / math.sqrt(64)
    assert layer.memory.abs().max() <= bound
    text = repr(layer)
    assert "N=50" in text and "Q=32" in text and "D=64" in text and "division=(4, 4, 2)" in text
    x = torch.randn(3, 8, 16, 16)
    y, w = layer(x, return_weights=True)
    assert y.shape == x.shape and w.shape == (3, 32, 50)
    torch.testing.assert_close(layer(x), y)
    clone = BlockMemory(channels=8, height=16, width=16, num_items=50, division=(4, 4, 2))
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), y)
    y.sum().backward()
    assert layer.memory.grad is not None and torch.isfinite(layer.memory.grad).all()


def test_layer_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    layer = BlockMemory(channels=4, height=8, width=8, num_items=20, division=(2, 2, 1),
                        backend="reference")
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


BAD_LAYER_ARGS = [
    (dict(division=(3, 4, 1)), ValueError, "not divisible"),
    (dict(division=(4, 4)), ValueError, "three integers"),
    (dict(threshold=0.0), ValueError, "threshold"),
    (dict(threshold=1.5), ValueError, "threshold"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(similarity="l2"), ValueError, "similarity"),
    (dict(shrink="soft"), ValueError, "shrink"),
    (dict(backend="tpu"), ValueError, "backend"),
    # Arguments of the wrong kind: clear messages.
    (dict(channels=0), ValueError, "channels must be an integer >= 1, got 0"),
    (dict(height=-4), ValueError, "height must be an integer >= 1"),
    (dict(width=8.0), ValueError, "width must be an integer >= 1, got 8.0"),
    (dict(num_items=2.5), TypeError, "num_items must be an integer, got float 2.5"),
    (dict(num_items=0), ValueError, "num_items must be >= 1"),
    (dict(division=None), ValueError, r"division must be three integers \(rh, rw, rc\), got None"),
    (dict(division=(4, 4.0, 1)), ValueError, "division must be three integers"),
    (dict(division="441"), ValueError, "division must be three integers"),
    (dict(threshold=torch.tensor(0.1)), TypeError,
     r"threshold must be a Python number, got a tensor of shape \(\); pass float\(threshold\)"),
    (dict(temperature=torch.tensor([1.0])), TypeError, "temperature must be a Python number"),
    (dict(threshold="0.1"), TypeError, "threshold must be a real number, got str"),
    (dict(threshold=True), TypeError, "threshold must be a real number, got bool"),
    (dict(temperature=1e-39), ValueError, "underflows float32"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_LAYER_ARGS)
def test_layer_rejects_bad_arguments(kwargs, error, message):
    args = dict(channels=4, height=8, width=8, num_items=10, division=(4, 4, 1)) | kwargs
    with pytest.raises(error, match=message):
        BlockMemory(**args)


def _bad_calls():
    x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 16)
    return [
        ((x[0], memory, (4, 4, 1)), ValueError, "4-D"),
        ((x[:, :0], memory, (4, 4, 1)), ValueError, "C, H, W >= 1"),
        ((x, memory[0], (4, 4, 1)), ValueError, "2-D"),
        ((x, memory, (3, 4, 1)), ValueError, "H=8 is not divisible by rh=3"),
        ((x, memory, (4, 4, 3)), ValueError, "C=4 is not divisible by rc=3"),
        ((x, torch.randn(10, 17), (4, 4, 1)), ValueError, "D=17"),
        ((x, torch.randn(0, 16), (4, 4, 1)), ValueError, "at least one item"),
        ((x.long(), memory.long(), (4, 4, 1)), TypeError, "floating-point"),
        ((x, memory.double(), (4, 4, 1)), TypeError, "same dtype"),
        ((x, memory.to("meta"), (4, 4, 1)), ValueError, "same device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_functional_rejects_bad_inputs(case, backend):
    args, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        block_memory(*args, backend=backend)


def test_layer_rejects_input_of_another_shape():
    layer = BlockMemory(channels=4, height=8, width=8, num_items=10, division=(4, 4, 1))
    with pytest.raises(ValueError, match=r"built for inputs \(B, 4, 8, 8\)"):
        layer(torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="built for inputs"):
        layer(torch.randn(4, 8, 8))


def test_unknown_and_unavailable_backends_are_named():
    x, memory = torch.randn(1, 4, 8, 8), torch.randn(10, 16)
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*reference"):
        block_memory(x, memory, (4, 4, 1), backend="tpu")
    with pytest.raises(ValueError, match="'cuda' is not available.*available"):
        block_memory(x, memory, (4, 4, 1), backend="cuda")
    assert "reference" in available_backends("cpu")
