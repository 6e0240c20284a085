"""Running an exported detector: ONNX Runtime, OpenVINO or ``torch.export``, one interface.

:func:`load_runtime` opens the folder ``models.export`` wrote (or its graph file) in the runtime
of its format; ``run`` scores uint8 images (B, H, W, C) of any height and width, as decoded
(:func:`models.data.images.read_pixels`), and returns NumPy anomaly maps (B, S, S) and scores
(B,), as ``models.predict`` computes them. ``info`` is the folder's ``detector.json``.

Example:
    >>> from models.data.images import read_pixels
    >>> from models.inference.runtimes import load_runtime
    >>> runtime = load_runtime("runs/hazelnut/openvino")  # doctest: +SKIP
    >>> maps, scores = runtime.run(read_pixels("hazelnut.png", runtime.info["in_channels"])[None])  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Optional

import numpy as np
import torch

#: The names of the graph's input and outputs, and of the description beside it.
INPUT = "image"
OUTPUTS = ("anomaly_map", "score")
INFO_FILE = "detector.json"
#: What a runtime and :class:`~models.inference.Detector` read of ``detector.json``.
INFO_KEYS = {"format", "file", "in_channels", "size", "gamma", "image_score", "sigma", "anomaly_map", "ali_reduction",
             "calibration"}


class MissingExtraError(ImportError):
    """A format or runtime whose packages are not installed; the message names the pip extra."""


def require(modules: tuple[str, ...], extra: str, purpose: str) -> None:
    """Raises :class:`MissingExtraError` unless every module imports."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}, not installed: "
                                f"pip install 'daad-ext[{extra}]'")


#: Precisions of :func:`load_runtime`; bf16 is OpenVINO's (its inference precision hint).
PRECISIONS = ("fp32", "bf16")


class Runtime:
    """An exported detector in one runtime; ``info`` is its ``detector.json``."""

    modules: tuple[str, ...] = ()
    extra = ""
    precisions: tuple[str, ...] = ("fp32",)

    def __init__(self, path: str, info: dict, precision: str, threads: Optional[int]) -> None:
        if precision not in self.precisions:
            raise ValueError(f"the {info['format']} runtime runs {' or '.join(self.precisions)}, not {precision}")
        if self.modules:
            require(self.modules, self.extra, f"running a {info['format']} export")
        self.info, self.precision, self.threads = info, precision, threads
        self.load(path)

    def load(self, path: str) -> None:
        raise NotImplementedError

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W, C), or (B, H, W) for one channel -> float32 anomaly maps (B, S, S)
        and scores (B,)."""
        channels = self.info["in_channels"]
        if channels == 1 and images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
            raise ValueError(f"the detector takes uint8 images (batch, height, width, {channels}), "
                             f"got {images.dtype} {images.shape}")
        maps, scores = self.outputs(np.ascontiguousarray(images))
        return np.asarray(maps), np.asarray(scores)


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU provider."""

    modules, extra = ("onnxruntime",), "onnx"

    def load(self, path: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.session.run(None, {INPUT: images}))


class OpenVinoRuntime(Runtime):
    """OpenVINO on the CPU; bf16 where the CPU has it (OpenVINO computes in float32 elsewhere)."""

    modules, extra, precisions = ("openvino",), "openvino", PRECISIONS

    def load(self, path: str) -> None:
        import openvino as ov

        # The precision always explicit: OpenVINO's default is bf16 where the CPU has it.
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[self.precision]}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self.model = ov.Core().compile_model(path, "CPU", config)

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.model(images)
        return tuple(result[name] for name in OUTPUTS)


class TorchRuntime(Runtime):
    """``torch.export.load`` of a pt2 export, run eagerly (on torch's own threads)."""

    def load(self, path: str) -> None:
        self.module = torch.export.load(path).module()

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            maps, scores = self.module(torch.tensor(images))  # a copy: decoded images are often read-only
        return maps.numpy(), scores.numpy()


RUNTIMES = {"onnx": OnnxRuntime, "openvino": OpenVinoRuntime, "pt2": TorchRuntime}


def export_info(path: str) -> tuple[str, dict]:
    """The folder of an export (``path``, or the folder of the graph file ``path``) and its
    ``detector.json``; raises when it is not a current export of ``models.export``."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    info_path = os.path.join(folder, INFO_FILE)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"no {INFO_FILE} in {folder}: not a folder written by models.export")
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{info_path} cannot be read ({e}); export the detector again") from e
    if not isinstance(info, dict) or info.get("format") not in RUNTIMES or info.get("input_dtype") != "uint8" \
            or not INFO_KEYS <= info.keys():
        raise ValueError(f"{info_path}: not a current export of models.export (an older or unknown kind, or keys "
                         f"missing); export it again")
    return folder, info


def load_runtime(path: str, precision: str = "fp32", threads: Optional[int] = None) -> Runtime:
    """The export in folder ``path`` (or the folder of the graph file ``path``) in its format's
    runtime, computing in ``precision`` (:data:`PRECISIONS`); ``threads`` sets ONNX Runtime's and
    OpenVINO's intra-op threads (default: theirs, one a core)."""
    folder, info = export_info(path)
    graph = os.path.join(folder, info["file"])
    try:
        return RUNTIMES[info["format"]](graph, info, precision, threads)
    except (ValueError, MissingExtraError):
        raise
    except Exception as e:  # the runtimes' own errors (a missing or corrupt graph file) are of their types
        raise ValueError(f"{graph} cannot be loaded in {info['format']}'s runtime ({type(e).__name__}: {e}); "
                         "export the detector again") from e
