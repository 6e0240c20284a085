"""The rule of a required run (daad_ext/extension.py, tests/conftest.py): under CI (``CI=true``) or
with ``DAAD_REQUIRE_EXTENSION=1`` an incomplete build fails the run with its reason; elsewhere the
tests of a missing kernel skip. These tests run whatever the build."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from daad_ext import extension, toolkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ci,require,expected", [("true", None, True), ("1", None, True),
                                                 (None, "1", True), ("false", None, False),
                                                 (None, None, False), (None, "0", False)])
def test_required_under_ci_or_the_variable(monkeypatch, ci, require, expected):
    for name, value in (("CI", ci), (extension.REQUIRE_ENV, require)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert extension.required() == expected


def _toolkit(root, parts=("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so.13")):
    for part in parts:
        path = root / part
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        path.chmod(0o755)
    return str(root)


def test_a_toolkit_needs_nvcc_headers_and_the_runtime(tmp_path):
    assert toolkit.is_cuda_toolkit(_toolkit(tmp_path / "full"))
    assert toolkit.is_cuda_toolkit(_toolkit(tmp_path / "lib", ("bin/nvcc", "include/cuda_runtime.h",
                                                                 "lib/libcudart.so")))
    assert not toolkit.is_cuda_toolkit(_toolkit(tmp_path / "wrapper", ("bin/nvcc",)))
    assert not toolkit.is_cuda_toolkit(_toolkit(tmp_path / "no-runtime",
                                                  ("bin/nvcc", "include/cuda_runtime.h")))
    assert not toolkit.is_cuda_toolkit(None)


def test_the_search_passes_over_a_wrapper_nvcc_to_a_real_toolkit(tmp_path):
    """As on machines whose nvcc on the PATH is a script outside the toolkit (torch would take
    its parent folder for CUDA_HOME and the link would stop on -lcudart)."""
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {tmp_path}/cuda-13.0/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    real = _toolkit(tmp_path / "cuda-13.0")
    env = {"PATH": str(wrapper.parent)}
    home, tried = toolkit.find_cuda_toolkit(env, defaults=(real,))
    assert home == real and tried == [f"{tmp_path} (nvcc on the PATH: {wrapper}): no include/cuda_runtime.h"]
    assert toolkit.find_cuda_toolkit({**env, "CUDA_HOME": real}, defaults=())[0] == real
    home, tried = toolkit.find_cuda_toolkit(env, defaults=(str(tmp_path / "none"),))
    assert home is None and len(tried) == 2  # setup.py then builds the CPU kernel alone, saying why


def test_shortfall_names_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "LOAD_ERROR", None)
    assert "is not built" in extension.shortfall(None)
    monkeypatch.setattr(extension, "LOAD_ERROR", "ImportError: invalid ELF header")
    assert "failed to load (ImportError: invalid ELF header)" in extension.shortfall(None)
    monkeypatch.setattr(extension, "cuda_toolkit", lambda: "/opt/cuda")
    assert "without its CUDA kernels, but the CUDA toolkit at /opt/cuda" in extension.shortfall(
        frozenset({"cpu"}))
    assert extension.shortfall(frozenset({"cpu", "cuda"})) is None
    monkeypatch.setattr(extension, "cuda_toolkit", lambda: None)
    assert extension.shortfall(frozenset({"cpu"})) is None


def test_no_cuda_variable_turns_the_cuda_requirement_off(monkeypatch):
    monkeypatch.setenv("DAAD_EXT_NO_CUDA", "1")
    assert extension.cuda_toolkit() is None


def _pytest_without_extension(require: bool) -> subprocess.CompletedProcess:
    """Collects tests/test_reference.py in a fresh process whose extension import fails as an
    unbuilt one does, with the rule on or off."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", extension.REQUIRE_ENV)}
    if require:
        env[extension.REQUIRE_ENV] = "1"
    code = ("import sys; sys.modules['daad_ext._C'] = None\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--collect-only', "
            "'tests/test_reference.py']))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_required_run_fails_without_the_extension_and_a_lenient_one_does_not():
    required = _pytest_without_extension(require=True)
    assert required.returncode == pytest.ExitCode.TESTS_FAILED, required.stdout[-2000:]
    assert "incomplete build" in required.stdout and "is not built" in required.stdout
    lenient = _pytest_without_extension(require=False)
    assert lenient.returncode == pytest.ExitCode.OK, lenient.stdout[-2000:] + lenient.stderr[-2000:]
