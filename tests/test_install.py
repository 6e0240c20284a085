"""Installing and loading: a compiled extension that fails to load, ``python -m daad_ext``, and
the installed detector's console commands run from another directory.

The install test builds the package from a copy of the sources into a temporary folder
(``pip install --no-build-isolation --no-deps --target``, CPU kernels only, offline), then runs
the four commands there: about 2 minutes to build and 2 to run on two busy cores (measured 132 s
and 146 s). It runs where ``DAAD_INSTALL_TESTS=1`` and is marked ``install``
(``DAAD_INSTALL_TESTS=1 pytest -m install tests/test_install.py``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What `pip install .` needs from the checkout.
SOURCES = ("setup.py", "pyproject.toml", "README.md", "csrc", "daad_ext", "models")


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("error", ['OSError("libcudart.so.13: cannot open shared object file")',
                                   'ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDevice")'])
def test_failed_extension_load_warns_once_and_falls_back(error):
    proc = run_python(f"""
        import importlib, warnings
        real = importlib.import_module
        def failing(name, *args, **kwargs):
            if name == "daad_ext._C":
                raise {error}
            return real(name, *args, **kwargs)
        importlib.import_module = failing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, daad_ext
            from daad_ext import ops, functional, available_backends, block_memory, block_memory_ref
            from daad_ext.extension import ExtensionWarning
        ours = [w for w in caught if issubclass(w.category, ExtensionWarning)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        print(ours[0].message)
        assert not ops.HAS_EXTENSION and available_backends("cpu") == ["reference"]
        x, memory = torch.randn(2, 4, 8, 8), torch.randn(10, 64)
        y, w = block_memory(x, memory, (2, 2, 1))
        torch.testing.assert_close(y, block_memory_ref(x, memory, (2, 2, 1))[0], rtol=0, atol=0)
        from daad_ext.info import report
        print(report())
    """, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.splitlines()[0]
    cause = error.split("(")[1].strip('")')
    assert cause in message and "pip install --no-build-isolation -e ." in message
    assert "FAILED TO LOAD" in proc.stdout  # python -m daad_ext's report names it too


def test_a_checkout_never_built_is_silent():
    proc = run_python("""
        import importlib, warnings
        real = importlib.import_module
        def unbuilt(name, *args, **kwargs):
            if name == "daad_ext._C":
                raise ModuleNotFoundError("No module named 'daad_ext._C'", name="daad_ext._C")
            return real(name, *args, **kwargs)
        importlib.import_module = unbuilt
        warnings.simplefilter("error")
        import daad_ext
        from daad_ext import ops
        assert not ops.HAS_EXTENSION
    """)
    assert proc.returncode == 0, proc.stderr


def test_python_m_daad_ext():
    proc = subprocess.run([sys.executable, "-m", "daad_ext"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    import torch
    from daad_ext import available_backends
    for needle in (f"torch {torch.__version__}", "triton ", "CUDA archs built:", "torch CPU capability:",
                   "features:", f"cpu   float32   auto -> {available_backends('cpu')[0]}",
                   "cpu   autocast to bfloat16: auto runs"):
        assert needle in out, (needle, out)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built from a copy of the sources and installed into a temporary folder."""
    tmp = tmp_path_factory.mktemp("install")
    source, target = tmp / "source", tmp / "target"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so",
                                                                               "_build_info.py"))
        else:
            shutil.copy2(path, source / name)
    env = dict(os.environ, DAAD_EXT_NO_CUDA="1", MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                           "--no-deps", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return target


@pytest.mark.install
@pytest.mark.skipif(os.environ.get("DAAD_INSTALL_TESTS") != "1",
                    reason="builds the package (minutes): set DAAD_INSTALL_TESTS=1")
@pytest.mark.usefixtures("single_thread")
def test_console_commands_from_another_directory(installed, hazelnut, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed), OMP_NUM_THREADS="1")
    bin_ = installed / "bin"

    def run(command: str, *args: str) -> str:
        proc = subprocess.run([str(bin_ / command), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout

    where = subprocess.run([sys.executable, "-c", "import daad_ext, daad_models, daad_ext._C; "
                            "print(daad_ext.__file__); print(daad_models.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(installed)) for line in where.stdout.split())  # not the checkout
    for command in ("daad-train", "daad-evaluate", "daad-predict", "daad-calibrate", "daad-export",
                    "daad-reproduce"):
        help_text = run(command, "--help")  # names the installed command, not `python -m models.*`
        assert help_text.startswith(f"usage: {command}") and "python -m models" not in help_text
    run("daad-train", "--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
        "--division", "2", "2", "1", "--num-items", "20", "--model", "daad+", "--epochs", "1",
        "--device", "cpu", "--out", "run")
    assert '"aupro"' in run("daad-evaluate", "--checkpoint", "run/checkpoint.pt", "--out", "eval",
                            "--num-heatmaps", "1", "--device", "cpu")
    image = str(hazelnut / "test" / "colour" / "00.jpg")
    assert "score=" in run("daad-predict", "run/checkpoint.pt", image, "--out", "pred", "--device", "cpu")
    run("daad-export", "--checkpoint", "run/checkpoint.pt", "--format", "pt2", "--out", "exported")
    assert (tmp_path / "exported" / "detector.pt2").stat().st_size > 0
