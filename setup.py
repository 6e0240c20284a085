"""Builds daad_ext and its C++ extension ``daad_ext._C``, and the detector as ``daad_models``.

    pip install --no-build-isolation .        # against your torch; -e for development
    pip install ".[models]"                   # also the detector's dependencies
    pip install ".[models,onnx,openvino]"     # and daad-export's formats with their runtimes

The CPU kernel is always built. The CUDA kernels (csrc/cuda/*.cu) are built when a CUDA toolkit is
found (daad_ext/toolkit.py: ``CUDA_HOME``, ``CUDA_PATH``, the nvcc on the PATH, /usr/local/cuda;
each checked for nvcc, headers and libcudart, since an nvcc on the PATH may be a wrapper outside
any toolkit), unless ``DAAD_EXT_NO_CUDA=1``; without one, the CPU kernel alone is built with one
warning that says where it looked. Without a visible GPU, the target
architectures default to ``TORCH_CUDA_ARCH_LIST=9.0`` (Hopper); set it for other GPUs.
What the build used is written to ``daad_ext/_build_info.py`` (``python -m daad_ext`` shows it).
The detector's source folder ``models/`` installs as the package ``daad_models`` (``models`` is
too common a name to claim), with the commands daad-train, daad-evaluate, daad-predict,
daad-calibrate, daad-export and daad-reproduce.
"""
import glob
import importlib.util
import os
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_toolkit():
    """daad_ext/toolkit.py's search, loaded by its path (the package is not built yet)."""
    spec = importlib.util.spec_from_file_location("daad_toolkit", os.path.join(ROOT, "daad_ext", "toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_toolkit()


NO_CUDA = os.environ.get("DAAD_EXT_NO_CUDA", "0") == "1"
TOOLKIT, TRIED = (None, []) if NO_CUDA else _find_toolkit()
if TOOLKIT is not None:
    os.environ["CUDA_HOME"] = TOOLKIT  # torch reads it when cpp_extension is imported, below
elif not NO_CUDA:
    warnings.warn("daad_ext: no CUDA toolkit found (" + ("; ".join(TRIED) or "no CUDA_HOME, CUDA_PATH or nvcc")
                  + "): building the CPU kernel only. For the CUDA kernels, set CUDA_HOME to a toolkit "
                  "(bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so); DAAD_EXT_NO_CUDA=1 builds the "
                  "CPU kernel without this warning.")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _write_build_info(cuda, archs) -> None:
    """Records the torch and CUDA the extension is built against (read by daad_ext/info.py)."""
    import torch
    info = {"torch": torch.__version__, "cuda": cuda, "cuda_archs": archs}
    text = f"# Written by setup.py at build time.\nBUILD = {info!r}\n"
    path = os.path.join(ROOT, "daad_ext", "_build_info.py")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _extension():
    sources = _sources("csrc/*.cpp")
    # -O3 and OpenMP; no -march=native, so that a built wheel runs on other x86-64 CPUs.
    # -fno-wrapv undoes the -fwrapv of Python's own CFLAGS, which setuptools passes first: with it,
    # GCC 12 left the CPU kernel's bfloat16 sums of squares (the query and item norms) scalar, and
    # the bf16 forward was 4-7% slower at DAAD's scales. The kernel relies on no signed overflow.
    cxx_flags = ["-O3", "-fno-wrapv", "-fopenmp", "-std=c++20"]
    cuda_sources = _sources("csrc/cuda/*.cu")
    with_cuda = TOOLKIT is not None and bool(cuda_sources)
    if not with_cuda:
        _write_build_info(cuda=None, archs=None)
        return CppExtension("daad_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    import torch
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    # Unset with a visible GPU: torch builds for that GPU's architecture.
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "%d.%d" % torch.cuda.get_device_capability()
    _write_build_info(cuda=torch.version.cuda, archs=archs)
    return CUDAExtension("daad_ext._C", sources + cuda_sources,
                         extra_compile_args={"cxx": cxx_flags + ["-DDAAD_EXT_WITH_CUDA"],
                                             "nvcc": nvcc_flags},
                         extra_link_args=["-fopenmp"])


setup(
    name="daad_ext",
    version="0.1.0",
    description="Block-wise memory of DAAD (Hou et al., ICCV 2021) with fused CPU, Triton and CUDA kernels",
    packages=(find_packages(include=["daad_ext", "daad_ext.*"])
              + ["daad_models"] + [f"daad_models.{name}" for name in find_packages("models")]),
    package_dir={"daad_models": "models"},
    python_requires=">=3.9",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"models": ["torchvision", "scikit-learn", "scipy", "tqdm", "matplotlib"],
                    "onnx": ["onnx", "onnxscript", "onnxruntime"],
                    "openvino": ["openvino"],
                    "tensorboard": ["tensorboard"],
                    "test": ["pytest", "hypothesis", "onnx", "onnxscript", "onnxruntime", "openvino"]},
    entry_points={"console_scripts": [f"daad-{command}=daad_models.cli:{command}"
                                      for command in ("train", "evaluate", "predict", "calibrate", "export",
                                                      "reproduce")]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
