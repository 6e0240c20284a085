"""The op glue (daad_ext/ops.py) and what the extension says about itself: fake kernels that check
their arguments under FakeTensorMode, torch.compile and torch.export with the eager messages; the
backward computing only the gradients autograd asks for; the extension's device and code tables."""
import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from daad_ext import BlockMemory, block_memory, ops, spec
from helpers import assert_refuses_tensors_on_another_device, tie_free_inputs

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="daad_ext._C is not built")

FORWARD = torch.ops.daad_ext.block_memory_forward if ops.HAS_EXTENSION else None
OK = (2, 2, 1, "cosine", "hard", 0.2, 1.0)


def _bad_forward_args():
    x, m = torch.randn(2, 4, 8, 8), torch.randn(5, 64)
    return [  # (name, args, error type of the spec, message)
        ("H not divisible", (x, m, 3, 2, 1) + OK[3:], ValueError,
         "feature map cannot be divided evenly into blocks: H=8 is not divisible by rh=3"),
        ("C not divisible", (x, torch.randn(5, 21), 2, 2, 3) + OK[3:], ValueError,
         "C=4 is not divisible by rc=3"),
        ("D mismatch", (x, torch.randn(5, 63)) + OK, ValueError, "item length D=63"),
        ("x 3-D", (x[0], m) + OK, ValueError, "x must be a 4-D tensor"),
        ("dtype mismatch", (x, m.double()) + OK, TypeError, "x and memory must have the same dtype"),
        ("int x", (x.int(), m.int()) + OK, TypeError, "x must be a floating-point tensor"),
        ("no items", (x, torch.randn(0, 64)) + OK, ValueError, "at least one item"),
        ("shrink", (x, m, 2, 2, 1, "cosine", "soft", 0.2, 1.0), ValueError, "unknown shrink 'soft'"),
        ("threshold", (x, m, 2, 2, 1, "cosine", "hard", 1.5, 1.0), ValueError,
         r"threshold must be in \(0, 1\]"),
        ("temperature inf", (x, m) + OK[:6] + (float("inf"),), ValueError,
         "temperature must be a finite number > 0"),
        ("temperature underflow", (x, m) + OK[:6] + (1e-39,), ValueError,
         r"temperature 1e-39 underflows float32 \(smallest normal 1.18e-38\)"),
    ]


CASES = _bad_forward_args()


@pytest.mark.parametrize("name,args,error,message", CASES, ids=[c[0] for c in CASES])
def test_fake_kernel_checks_like_the_eager_op(name, args, error, message):
    """Same message from the C++ op (RuntimeError), its fake kernel and torch.compile."""
    with pytest.raises(RuntimeError, match=message):
        FORWARD(*args)
    x, m, *options = args
    with FakeTensorMode() as mode, pytest.raises(error, match=message):
        FORWARD(mode.from_tensor(x), mode.from_tensor(m), *options)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, m: FORWARD(x, m, *options)[0], backend="eager",
                             fullgraph=True)
    with pytest.raises(Exception, match=message):
        compiled(x, m)


def test_export_rejects_bad_division_while_tracing():
    class Read(torch.nn.Module):
        def forward(self, x, m):
            return FORWARD(x, m, 3, 2, 1, "cosine", "hard", 0.2, 1.0)[0]

    x, m = torch.randn(2, 4, 8, 8), torch.randn(5, 64)
    with pytest.raises(Exception, match="H=8 is not divisible by rh=3"):
        torch.export.export(Read(), (x, m))


def test_export_with_dynamic_batch_runs():
    """The fake kernel's checks are size conditions, not guards on the batch: a dynamic batch
    exports, and the exported program runs at another batch size."""
    class Read(torch.nn.Module):
        def forward(self, x, m):
            return FORWARD(x, m, 2, 2, 1, "cosine", "hard", 0.2, 1.0)[0]

    x, m = torch.randn(2, 4, 8, 8), torch.randn(5, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Read(), (x, m), dynamic_shapes=({0: batch}, None))
    x3 = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(program.module()(x3, m), FORWARD(x3, m, *OK)[0])


def test_a_meta_tensor_beside_a_cpu_tensor_raises():
    """Dispatch sends a call with any meta tensor to the fake kernel, which checks the devices."""
    x, m = torch.randn(2, 4, 8, 8), torch.randn(5, 64)
    for args in ((x.to("meta"), m), (x, m.to("meta"))):
        with pytest.raises(ValueError, match="same device"):
            FORWARD(*args, *OK)
    y, *_ = FORWARD(x.to("meta"), m.to("meta"), *OK)  # both on meta: shapes only
    assert y.device.type == "meta" and y.shape == x.shape


@pytest.mark.parametrize("shrink", ["memae", "hard"])  # probs: MemAE's, else a placeholder
def test_every_tensor_on_another_device_is_refused(shrink):
    """A meta tensor among CPU ones sends the call to the fake kernel, which must refuse it, not
    return uninitialised gradients."""
    x, memory = tie_free_inputs((2, 4, 8, 8), 9, (2, 2, 1), "cosine", shrink)
    assert_refuses_tensors_on_another_device(FORWARD, torch.ops.daad_ext.block_memory_backward,
                                             x, memory, (2, 2, 1, "cosine", shrink, 1 / 9, 1.0))


# ---------------------------------------------------------------------------------------------
# The backward computes only the gradients autograd asks for.


def _grads(backend, x, memory, x_grad, memory_grad, similarity, shrink, through):
    xg = x.clone().requires_grad_(x_grad)
    mg = memory.clone().requires_grad_(memory_grad)
    y, w = block_memory(xg, mg, (2, 2, 2), similarity, shrink, backend=backend)
    gen = torch.Generator().manual_seed(1)
    loss = 0
    if "y" in through:
        loss = loss + (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    if "w" in through:
        loss = loss + (w * torch.randn(w.shape, generator=gen, dtype=w.dtype)).sum()
    loss.backward()
    return xg.grad, mg.grad


@pytest.mark.parametrize("through", ["yw", "y", "w"])
@pytest.mark.parametrize("similarity,shrink", [("cosine", "hard"), ("dot", "memae"),
                                               ("cosine", "memae"), ("dot", "none")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_skipped_gradient_is_none_and_the_other_unchanged(dtype, similarity, shrink, through,
                                                          monkeypatch):
    # Small chunks and row blocks, so that the skipped products span several of each.
    monkeypatch.setenv("DAAD_EXT_CPU_CHUNK_BYTES", "4096")
    monkeypatch.setenv("DAAD_EXT_CPU_ROW_BLOCK_BYTES", "1")
    x, memory = tie_free_inputs((3, 8, 16, 16), 11, (2, 2, 2), similarity, shrink, dtype=dtype)
    both = _grads("cpu", x, memory, True, True, similarity, shrink, through)
    x_only = _grads("cpu", x, memory, True, False, similarity, shrink, through)
    memory_only = _grads("cpu", x, memory, False, True, similarity, shrink, through)
    assert x_only[1] is None and memory_only[0] is None
    assert torch.equal(x_only[0], both[0]), "grad x differs when grad memory is skipped"
    assert torch.equal(memory_only[1], both[1]), "grad memory differs when grad x is skipped"


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)])
def test_backward_op_returns_empty_for_a_skipped_gradient(needs):
    x, memory = tie_free_inputs((2, 4, 8, 8), 9, (2, 2, 1), "cosine", "memae")
    options = (2, 2, 1, "cosine", "memae", 1 / 9, 1.0)
    y, w, probs, row_stats, item_norms = FORWARD(x, memory, *options)
    grad_x, grad_memory = torch.ops.daad_ext.block_memory_backward(
        torch.randn_like(y), None, x, memory, w, probs, row_stats, item_norms, *options, *needs)
    for grad, needed, like in ((grad_x, needs[0], x), (grad_memory, needs[1], memory)):
        if needed:
            assert grad.shape == like.shape and torch.isfinite(grad).all()
        else:
            assert grad.shape == (0,) and grad.dtype == x.dtype and grad.device == x.device
    torch.library.opcheck(torch.ops.daad_ext.block_memory_backward.default,
                          (torch.randn_like(y), torch.randn_like(w), x, memory, w, probs,
                           row_stats, item_norms, *options, *needs))


def test_frozen_layer_under_compile():
    """A frozen memory through torch.compile: the compiled backward gives grad x, no grad M."""
    torch.manual_seed(0)
    layer = BlockMemory(4, 8, 8, num_items=10, division=(2, 2, 1), backend="cpu")
    layer.memory.requires_grad_(False)
    x = torch.randn(2, 4, 8, 8)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        xx = x.clone().requires_grad_()
        fn(xx).square().sum().backward()
        results.append(xx.grad)
    assert layer.memory.grad is None
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# What the extension says about itself.


def test_extension_codes_agree_with_the_spec():
    """The C++ enums' table (csrc/op_checks.h) and daad_ext/spec.py's codes: one mapping."""
    from daad_ext import _C
    assert _C.SIMILARITY_CODES == spec.SIMILARITY_CODES
    assert _C.SHRINK_CODES == spec.SHRINK_CODES


def test_kernel_devices_match_the_dispatcher():
    """_C.KERNEL_DEVICES (the build's own word) against the dispatcher's registrations, read here
    through its private API, which the package itself no longer uses."""
    from daad_ext import _C
    assert "cpu" in _C.KERNEL_DEVICES and ops.KERNEL_DEVICES == frozenset(_C.KERNEL_DEVICES)
    for device in ("cpu", "cuda"):
        for op in (ops.FORWARD, ops.BACKWARD):
            registered = torch._C._dispatch_has_kernel_for_dispatch_key(op, device.upper())
            assert registered == (device in _C.KERNEL_DEVICES), (op, device)


def test_a_compiled_layer_is_compiled_once():
    """Resolving the backend at the first call must not change what the compiled graph is guarded
    on (it did: every compiled model with a BlockMemory compiled twice)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer, counter = BlockMemory(4, 8, 8, num_items=10, division=(2, 2, 1)), CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    x = torch.randn(2, 4, 8, 8)
    expected = copy.deepcopy(layer)(x)  # a copy: an eager call on the layer itself fills its cache
    for _ in range(3):
        torch.testing.assert_close(compiled(x), expected)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("through", ["function", "module"])
def test_a_channels_last_input_gives_a_channels_last_output(backend, through):
    """y comes out in x's memory format (as from a convolution), with the values and gradients
    of the same call on x in NCHW."""
    division = (2, 2, 1)
    x, memory = tie_free_inputs((2, 8, 8, 8), 12, division)
    layer = BlockMemory(8, 8, 8, division=division, num_items=12, backend=backend)
    with torch.no_grad():
        layer.memory.copy_(memory)

    def run(inp):
        inp = inp.detach().requires_grad_()
        y, w = layer(inp, return_weights=True) if through == "module" else block_memory(inp, memory, division,
                                                                                       backend=backend)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        return y, w, inp.grad

    y, w, grad = run(x)
    y_cl, w_cl, grad_cl = run(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous() and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_cl, y) and torch.equal(w_cl, w)
    torch.testing.assert_close(grad_cl, grad)
