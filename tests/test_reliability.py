"""Extreme and malformed input on every path (reference, fused C++ op, functional, layer): index
arithmetic beyond 2^31 elements, temperatures that underflow or are infinite, half precision
through the reference, and arguments of the wrong kind."""
import math
import os

import numpy as np
import pytest
import torch

from daad_ext import BlockMemory, available_backends, block_memory, block_memory_ref, ops
from helpers import tie_free_inputs

needs_cpu_kernel = pytest.mark.skipif("cpu" not in ops.KERNEL_DEVICES,
                                      reason="daad_ext._C was built without the CPU kernel")
FORWARD = torch.ops.daad_ext.block_memory_forward if ops.HAS_EXTENSION else None


# ---------------------------------------------------------------------------------------------
# Index arithmetic: offsets past 2^31 elements, without allocating them.


@pytest.fixture
def sparse_storage(tmp_path):
    """A float32 tensor of 3 * 2^30 + 64 elements (12 GiB) backed by a sparse file: only the
    pages written are ever materialised, so views with strides of 2^30 elements are in bounds."""
    size = 3 * 2**30 + 64
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(size * 4)
    yield torch.from_file(str(path), shared=False, size=size, dtype=torch.float32)
    os.unlink(path)


def _big_stride_view(storage, values, strides):
    view = storage.as_strided(values.shape, strides)
    view.copy_(values)
    return view


@needs_cpu_kernel
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_views_with_offsets_past_2_to_31(sparse_storage, backend):
    """x, memory and grad_y whose element offsets pass 2^31 (channel / column strides of 2^30, as
    in a view into a sparse file) give the results of their contiguous copies."""
    division = (2, 2, 1)
    x, memory = tie_free_inputs((1, 4, 4, 4), 5, division, seed=3)
    grad_y = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    big = 2**30
    x_view = _big_stride_view(sparse_storage, x, (4 * big, big, 4, 1))
    # The memory's columns and grad_y's channels interleave with x's in the same storage.
    column_stride = 3 * 2**26  # the 16th column (D = 16) starts past 2^31
    memory_view = _big_stride_view(sparse_storage[32:], memory, (1, column_stride))
    grad_view = _big_stride_view(sparse_storage[16:], grad_y, (4 * big, big, 4, 1))
    assert 3 * big > 2**31 and 15 * column_stride > 2**31

    def run(x, memory, grad_y):
        x = x.detach().requires_grad_()
        memory = memory.detach().requires_grad_()
        y, w = block_memory(x, memory, division, backend=backend)
        y.backward(grad_y)
        return y, w, x.grad, memory.grad

    for got, want in zip(run(x_view, memory_view, grad_view), run(x, memory, grad_y)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@needs_cpu_kernel
def test_cpu_kernel_refuses_more_than_int_max_items():
    """The row epilogue counts items in int: N >= 2^31 is refused before anything is allocated
    (an expanded memory: 2^31 rows of stride 0)."""
    x = torch.randn(1, 4, 1, 1)
    memory = torch.randn(1, 4).expand(2**31, 4)
    with pytest.raises(RuntimeError, match=r"supports up to 2147483647 memory items .*N=2147483648"):
        FORWARD(x, memory, 1, 1, 1, "dot", "none", 0.5, 1.0)
    with pytest.raises(RuntimeError, match="N=2147483648"):
        block_memory(x, memory, (1, 1, 1), "dot", "none", backend="cpu")


# ---------------------------------------------------------------------------------------------
# Temperatures: one behaviour on every path.


def _every_path(x, memory, temperature):
    """Calls of the same read through every path: the layer, each backend, the reference, the
    raw C++ op."""
    division = (2, 2, 1)

    def layer():
        module = BlockMemory(4, 4, 4, num_items=memory.shape[0], division=division,
                             temperature=temperature, dtype=x.dtype)
        return module(x)

    calls = {"BlockMemory": layer, "block_memory_ref":
             lambda: block_memory_ref(x, memory, division, temperature=temperature)}
    for backend in available_backends(x.device, x.dtype):
        calls[backend] = (lambda backend=backend: block_memory(
            x, memory, division, temperature=temperature, backend=backend))
    if ops.supports(x.device, x.dtype):
        calls["raw op"] = lambda: FORWARD(x, memory, 2, 2, 1, "cosine", "hard",
                                          1 / memory.shape[0], temperature)
    return calls


@pytest.mark.parametrize("temperature,dtype,message", [
    (1e-39, torch.float32, r"temperature 1e-39 underflows float32 \(smallest normal 1.18e-38\), "
                           r"the precision float32 inputs"),
    (1e-39, torch.float16, r"underflows float32 .* the precision float16 inputs"),
    (float("inf"), torch.float32, "temperature must be a finite number > 0, got inf"),
    (float("inf"), torch.float64, "temperature must be a finite number > 0, got inf"),
    (float("nan"), torch.float32, "temperature must be a finite number > 0, got nan"),
    (-1.0, torch.float64, "temperature must be a finite number > 0, got -1"),
])
def test_bad_temperature_is_refused_everywhere(temperature, dtype, message):
    x, memory = torch.randn(2, 4, 4, 4, dtype=dtype), torch.randn(6, 16, dtype=dtype)
    for name, call in _every_path(x, memory, temperature).items():
        error = RuntimeError if name == "raw op" else ValueError
        with pytest.raises(error, match=message):
            call()


def test_tiny_temperature_in_float64_is_finite_everywhere():
    """1e-39 is a normal float64: the rows are one-hot, not NaN."""
    x, memory = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    outputs = {name: call() for name, call in _every_path(x, memory, 1e-39).items()}
    want = outputs["block_memory_ref"][0]
    assert torch.isfinite(want).all()
    for name, out in outputs.items():
        y = out if isinstance(out, torch.Tensor) else out[0]
        if name != "BlockMemory":  # the layer has its own memory
            torch.testing.assert_close(y, want, msg=name)


# ---------------------------------------------------------------------------------------------
# Half precision through the reference: floors and normalisation in float32.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_reference_has_no_nan_rows(dtype):
    x, memory = torch.randn(2, 4, 4, 4), torch.randn(6, 16)
    x[0, :, :2, :2] = 0      # an all-zero block (query 0 of image 0)
    memory[2] = 0            # a zero memory item
    for shrink, threshold in (("hard", None), ("memae", None), ("memae", 1.0), ("none", None)):
        y, w = block_memory_ref(x.to(dtype), memory.to(dtype), (2, 2, 1), shrink=shrink,
                                threshold=threshold)
        assert y.dtype == dtype and w.dtype == dtype
        assert torch.isfinite(y).all() and torch.isfinite(w).all(), (shrink, threshold)
        y32, w32 = block_memory_ref(x.to(dtype).float(), memory.to(dtype).float(), (2, 2, 1),
                                    shrink=shrink, threshold=threshold)
        torch.testing.assert_close(y, y32.to(dtype))
        torch.testing.assert_close(w, w32.to(dtype))
    _, w = block_memory_ref(x.to(dtype), memory.to(dtype), (2, 2, 1), shrink="memae",
                            threshold=1.0)
    assert (w == 0).all()  # nothing passes a threshold of 1: zero rows, not NaN


def test_half_reference_gradients_are_finite():
    x = torch.randn(2, 4, 4, 4, dtype=torch.float16)
    x[0, :, :2, :2] = 0
    x.requires_grad_()
    memory = torch.randn(6, 16, dtype=torch.float16, requires_grad=True)
    y, w = block_memory(x, memory, (2, 2, 1), shrink="memae", backend="reference")
    (y.float().sum() + w.float().sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(memory.grad).all()
    assert x.grad.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# Arguments of the wrong kind (the layer's: tests/test_reference.py's BAD_LAYER_ARGS).


@pytest.mark.parametrize("division", [np.array([4, 4, 1]), (np.int64(4), np.int32(4), np.uint8(1))],
                         ids=["array", "numpy-integers"])
def test_numpy_numbers_are_accepted(division):
    """NumPy scalars are numbers, and a 1-D NumPy integer array a division: the same read as with
    the Python numbers."""
    x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 16)
    want = block_memory(x, memory, (4, 4, 1), threshold=0.125, temperature=0.5)
    got = block_memory(x, memory, division, threshold=np.float32(0.125),
                       temperature=np.float64(0.5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layer = BlockMemory(np.int64(4), 8, 8, num_items=np.int64(10), division=division,
                        threshold=np.float32(0.125))
    assert layer.num_items == 10 and math.isclose(layer.threshold, 0.125)
    assert layer.division == (4, 4, 1) and all(type(r) is int for r in layer.division)
    layer(x)


@pytest.mark.parametrize("division", [np.array([4.0, 4.0, 1.0]), np.array([[4, 4, 1]]),
                                      np.array([4, 4])], ids=["floats", "2-D", "two"])
def test_numpy_divisions_that_are_not_three_integers_are_refused(division):
    x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 16)
    with pytest.raises(ValueError, match="division must be three integers"):
        block_memory(x, memory, division)


def test_functional_refuses_a_tensor_threshold():
    x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 16)
    with pytest.raises(TypeError, match="threshold must be a Python number"):
        block_memory(x, memory, (4, 4, 1), threshold=torch.tensor(0.1))
    with pytest.raises(ValueError, match="division must be three integers"):
        block_memory(x, memory, None)


def test_layer_refuses_input_of_another_dtype_or_device():
    layer = BlockMemory(4, 8, 8, num_items=10, division=(4, 4, 1))
    with pytest.raises(TypeError, match="memory is torch.float32 on cpu, got input torch.float64"):
        layer(torch.randn(2, 4, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="built for inputs"):
        layer(np.zeros((2, 4, 8, 8)))
