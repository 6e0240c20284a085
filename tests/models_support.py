"""Shared by the tests of models/: where the real data is, and single-threaded torch.

No tests here. The real data lives in <repo>/../shared/data (read-only in CI), or in $DAAD_DATA.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("DAAD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAZELNUT = DATA / "mvtec_hazelnut_subset"
MNIST = DATA / "mnist_t10k"
needs_hazelnut = pytest.mark.skipif(not HAZELNUT.is_dir(), reason=f"real data absent: {HAZELNUT}")
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason=f"real data absent: {MNIST}")


@pytest.fixture(autouse=True)
def single_thread():
    """Runs each test with one intra-op thread, then restores the count.

    The models' tests use tiny tensors, where a second thread gains nothing; on a busy machine
    OpenMP's waiting for a descheduled thread made them 10-20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
