"""All-zero blocks and an all-zero memory item under cosine similarity, in every backend.

Below the norm floor (1e-12) a vector carries no direction, so no gradient flows through the
similarity to it (daad_ext/reference.py): an all-zero block gets a zero gradient and an all-zero
item only its gradient through y. Every backend is compared with the float64 reference on inputs
with two zero blocks and a zero item (tests/helpers.py), and with two blocks and an item scaled
below the floor but not zero, forward and backward, and must give finite gradients that are
exactly zero on those blocks:

* the C++ CPU kernel, in each dtype it supports;
* the Triton kernels on a GPU in float32, float16 and bfloat16 (skipped without one); in
  Triton's interpreter (float32, both paths) they are the ``zero-rows-*`` cases of
  tests/triton_cases.py;
* the CUDA kernels on the host execution layer (``cuda_host``, tests/test_cuda.py) and on a GPU,
  in float32, float16 and bfloat16.

The reference's own gradient of zero rows, in every dtype, is tested in tests/test_reference.py.
"""
from __future__ import annotations

import pytest
import torch

from daad_ext import available_backends
from helpers import (ZERO_ITEM, assert_matches_reference, tie_free_inputs, zero_block_grads,
                     zero_rows)
from test_cuda import Target, target  # noqa: F401  (target: the cuda / cuda_host fixture)

SHAPE, ITEMS, DIVISION = (2, 4, 4, 4), 11, (2, 2, 1)
TEMPERATURE = 0.2  # spreads the softmax, so that few weights sit near the threshold
#: (shrink, threshold): thresholds below 1/N, so that a zero block's uniform weights (1/N each)
#: keep a margin from them.
SHRINKS = (("hard", 0.5 / ITEMS), ("memae", 0.5 / ITEMS), ("none", None))
#: Multipliers of the blocks and the item: all zero, or nonzero below the floor (1e-14 * randn;
#: float16 rounds it to zero).
SCALES = {"zero": 0.0, "tiny": 1e-14}
#: Tolerances against the float64 reference (as tests/test_cuda.py's): half types store w, y and
#: the gradients in 16 bits. Half-type inputs keep a 5% margin from the threshold.
TOLERANCES = {torch.float64: dict(atol=1e-9, rtol=1e-7),
              torch.float32: dict(atol=5e-5, rtol=5e-4),
              torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}
HALF_TYPES = (torch.float16, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_GPU = torch.cuda.is_available()


def check_zero_rows(backend: str, dtype: torch.dtype, shrink: str, threshold, scale: str,
                    device: str = "cpu", seed: int = 0) -> None:
    """``backend`` against the reference on inputs with zero (or below-floor) blocks and item."""
    x, memory = tie_free_inputs(SHAPE, ITEMS, DIVISION, "cosine", shrink, threshold, TEMPERATURE,
                                dtype=dtype, device=device, seed=seed,
                                margin=0.05 if dtype in HALF_TYPES else 1e-3,
                                transform=zero_rows(DIVISION, SCALES[scale]))
    assert memory[ZERO_ITEM].double().norm() < 1e-12
    got = assert_matches_reference(backend, x, memory, DIVISION, "cosine", shrink, threshold,
                                   TEMPERATURE, seed=seed, **TOLERANCES[dtype])
    what = f"{backend} {dtype} {shrink} {scale}"
    for name, value in zip(("y", "w", "grad x", "grad memory"), got):
        assert torch.isfinite(value).all(), f"{what}: {name} not finite"
    for block in zero_block_grads(got[2], DIVISION):
        assert (block == 0).all(), f"{what}: the gradient of a block below the floor {block}"


CPU_DTYPES = [d for d in (torch.float32, torch.float64) + HALF_TYPES
              if "cpu" in available_backends("cpu", d)]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shrink,threshold", SHRINKS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_cpu(dtype, shrink, threshold, scale):
    check_zero_rows("cpu", dtype, shrink, threshold, scale)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shrink,threshold", SHRINKS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_cuda_kernels(target: Target, dtype, shrink, threshold, scale):
    check_zero_rows(target.backend, dtype, shrink, threshold, scale, device=target.device)


@pytest.mark.skipif(not (HAS_GPU and "triton" in available_backends("cuda")),
                    reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("shrink,threshold", SHRINKS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_triton_gpu(dtype, shrink, threshold, scale):
    check_zero_rows("triton", dtype, shrink, threshold, scale, device="cuda")

