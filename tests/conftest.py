"""The rule of a required run, and the fixtures of the tests of models/ (the other test files use
none of them).

Under CI (``CI=true``) or with ``DAAD_REQUIRE_EXTENSION=1`` the run fails before collecting
anything when the compiled extension is missing, does not load, or lacks the CUDA kernels where a
CUDA toolkit would build them (daad_ext/extension.py); elsewhere the tests of a missing kernel skip.

The real data sets are found through ``models.data.data_root()``: ``$DAAD_DATA_ROOT``, else
``../shared/data`` beside the checkout; a test that needs an absent one is skipped, saying where
it looked.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_sessionstart(session: pytest.Session) -> None:
    from daad_ext import extension, ops

    if not extension.required():
        return
    problem = extension.shortfall(ops.KERNEL_DEVICES if ops.HAS_EXTENSION else None)
    if problem is not None:
        pytest.exit(f"incomplete build ({extension.REQUIRE_ENV}=1 or CI=true requires the "
                    f"complete one): {problem}", returncode=pytest.ExitCode.TESTS_FAILED)


def _real_data(name: str) -> Path:
    """The real data set ``name``; absent, its tests skip, except under CI (which has the data:
    a missing folder there would silently skip every end-to-end test of the detector)."""
    from daad_ext import extension
    from models.data import DATA_ROOT_ENV, data_root  # here: the other tests need not import models

    path = data_root() / name
    if not path.is_dir():
        reason = f"real data absent: {path} (set {DATA_ROOT_ENV} to the folder that holds {name}/)"
        if extension.required():
            pytest.fail(reason + f"; CI=true or {extension.REQUIRE_ENV}=1 requires it")
        pytest.skip(reason)
    return path


@pytest.fixture
def hazelnut() -> Path:
    """The MVTec AD hazelnut subset (28 training images, 6 good and 17 'colour' test images)."""
    return _real_data("mvtec_hazelnut_subset")


@pytest.fixture
def mnist() -> Path:
    """The MNIST t10k IDX files."""
    return _real_data("mnist_t10k")


@pytest.fixture
def single_thread():
    """Runs a test with one intra-op thread, then restores the count.

    The models' tests use tiny tensors, where a second thread gains nothing; on a busy machine
    OpenMP's waiting for a descheduled thread made them 10-20x slower. Model test files use it
    with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A daad+ detector trained for one epoch on the hazelnut subset at 32x32 (seconds, one thread)
    with a quarter of the training images held out (``--val-ratio 0.25``), plain float32: its
    checkpoint and its trainer."""
    import warnings

    from models import train
    from models.inference.run_scoring import UntrainedWarning

    hazelnut = _real_data("mvtec_hazelnut_subset")
    out = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWarning)  # one epoch: it has not learnt yet
        trainer = train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
                              "--division", "2", "2", "1", "--num-items", "20", "--batch", "8", "--device", "cpu",
                              "--model", "daad+", "--epochs", "1", "--val-ratio", "0.25", "--no-fast",
                              "--out", str(out)])
    torch.set_num_threads(threads)
    return out / "checkpoint.pt", trainer

