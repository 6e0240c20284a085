"""The detector as one exportable graph: images as decoded -> (anomaly map, calibrated score).

The resize and scaling of the data sets and ``predict`` (:func:`models.data.preprocess.to_model_input`),
the generator, the discriminator's features (for the "+" variants) and the scoring of a
calibrated :class:`~models.inference.Scorer` (either image score) are all in the graph; the
block-wise memories are written in standard operators (daad_ext/export.py), so ONNX Runtime,
OpenVINO or ``torch.export.load`` need neither daad_ext nor this package
(:mod:`models.inference.runtimes` runs them). The Python API behind ``daad-export``
(:mod:`models.export`).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from daad_ext.export import decompose

from ..data.preprocess import to_model_input
from ..networks import AnomalyDetector
from ..training.atomic import atomic_folder, write_json
from .scorer import Scorer

INPUT = "image"
OUTPUTS = ("anomaly_map", "score")
INFO_FILE = "detector.json"
#: ONNX opset of the exported graph (ONNX Runtime 1.17+ and OpenVINO 2024+ run it).
OPSET = 18


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


@dataclass(frozen=True)
class Format:
    """An export format: its graph file in the folder and the packages that write it."""
    file: str
    modules: tuple[str, ...] = ()
    extra: Optional[str] = None


FORMATS = {"onnx": Format("detector.onnx", ("onnx", "onnxscript"), "onnx"),
           "openvino": Format("detector.xml", ("openvino",), "openvino"),
           "pt2": Format("detector.pt2")}


class ScoringGraph(nn.Module):
    """The detector with the scoring of ``daad-predict``: uint8 images (B, H, W, C) of any height
    and width -> anomaly maps (B, S, S) and scores (B,)."""

    def __init__(self, model: AnomalyDetector, scorer: Scorer) -> None:
        super().__init__()
        if scorer.calibration is None:
            raise ValueError("an exported graph scores images one at a time: it needs a calibrated scorer")
        self.model, self.scorer = model.eval(), scorer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_input(images.permute(0, 3, 1, 2), self.model.config.size)
        s = self.model.score(x, self.scorer.ali_reduction, self.scorer.anomaly_map)
        return s.error_map, self.scorer.score_torch(s.error_map, s.feat)


def example_images(model: AnomalyDetector, batch: int = 2) -> torch.Tensor:
    """uint8 (batch, H, W, C) images to trace the graph with, of another size than the model's
    (so that nothing is specialised to it)."""
    size = model.config.size
    return torch.zeros(batch, size + 3, size + 5, model.config.in_channels, dtype=torch.uint8)


def export_program(graph: ScoringGraph, images: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the graph with a dynamic batch, height and width, the memories in
    standard operators."""
    dynamic = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        return decompose(torch.export.export(graph, (images,), dynamic_shapes={"images": {0: dynamic, 1: dynamic,
                                                                                          2: dynamic}}))


def write_onnx(program: torch.export.ExportedProgram, images: torch.Tensor, path: str) -> None:
    onnx_program = torch.onnx.export(program, (images,), input_names=[INPUT], output_names=list(OUTPUTS),
                                     opset_version=OPSET, dynamo=True, verbose=False)
    onnx_program.save(path)


def write_openvino(program: torch.export.ExportedProgram, _images: torch.Tensor, path: str) -> None:
    """OpenVINO's IR (``.xml`` and ``.bin``), converted from the program, float32 weights kept."""
    import openvino as ov

    model = ov.convert_model(program)
    for port, name in zip([*model.inputs, *model.outputs], [INPUT, *OUTPUTS]):
        port.get_tensor().set_names({name})
    ov.save_model(model, path, compress_to_fp16=False)


WRITERS: dict[str, Callable[[torch.export.ExportedProgram, torch.Tensor, str], None]] = {
    "onnx": write_onnx, "openvino": write_openvino,
    "pt2": lambda program, _images, path: torch.export.save(program, path)}


def require_format(fmt: str) -> Format:
    """The format ``fmt``; raises ValueError when unknown, :class:`MissingExtraError` when its
    packages are not installed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {tuple(FORMATS)}")
    spec = FORMATS[fmt]
    if spec.extra:
        require(spec.modules, spec.extra, f"--format {fmt}")
    return spec


def export_graph(graph: ScoringGraph, fmt: str, out: str, info: dict[str, Any]) -> str:
    """Writes the graph in format ``fmt`` (:data:`FORMATS`) and ``detector.json`` (``info``, the
    input and output names and the scoring) to ``out``, all or nothing; returns the graph's path.
    The graph runs on the CPU."""
    spec = require_format(fmt)
    model = graph.model.cpu()
    for memory in model.memories():  # exported on the CPU: a checkpoint trained with --backend cuda too
        memory.backend = "auto"
    images = example_images(model)
    program = export_program(graph, images)
    s = graph.scorer
    with atomic_folder(out) as folder:
        WRITERS[fmt](program, images, os.path.join(folder, spec.file))
        write_json(os.path.join(folder, INFO_FILE),
                   {**info, "in_channels": model.config.in_channels, "size": model.config.size, "input": INPUT,
                    "input_layout": "NHWC", "input_dtype": "uint8", "outputs": list(OUTPUTS), "gamma": s.gamma,
                    "image_score": s.image_score, "sigma": s.sigma, "anomaly_map": s.anomaly_map,
                    "calibration": dict(s.calibration), "format": fmt, "file": spec.file}, indent=2)
    return os.path.join(out, spec.file)
