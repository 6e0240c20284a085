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

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from daad_ext.export import decompose

from ..data.preprocess import to_model_input
from ..networks import AnomalyDetector
from ..training.atomic import atomic_folder, write_json
from .runtimes import INFO_FILE, INPUT, OUTPUTS, load_runtime, require
from .scorer import Scorer

#: ONNX opset of the exported graph (ONNX Runtime 1.17+ and OpenVINO 2024+ run it).
OPSET = 18
#: The most an export's maps and scores may differ from PyTorch's, relative to the largest
#: (float32 rounding in another order of operations; tests/test_export.py holds them to 1e-4).
CHECK_TOLERANCE = 1e-4


class ExportCheckError(ValueError):
    """An exported graph that does not compute what the PyTorch graph computes."""


@dataclass(frozen=True)
class Format:
    """An export format: its graph file in the folder and the packages that write it and run it
    (to check it), installed by the pip extra ``extra``."""
    file: str
    modules: tuple[str, ...] = ()
    extra: Optional[str] = None


FORMATS = {"onnx": Format("detector.onnx", ("onnx", "onnxscript", "onnxruntime"), "onnx"),
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
    """Random uint8 (batch, H, W, C) images, of another size than the model's, to trace the graph
    with (so that nothing is specialised to the model's size) and to check the export on."""
    size = model.config.size
    return torch.randint(0, 256, (batch, size + 3, size + 5, model.config.in_channels), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


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


def check_export(graph: ScoringGraph, folder: str, images: torch.Tensor) -> None:
    """Raises :class:`ExportCheckError` unless the export in ``folder``, in its runtime, computes
    the maps and scores of ``graph`` on ``images`` (:data:`CHECK_TOLERANCE`)."""
    with torch.no_grad():
        expected = [t.numpy() for t in graph(images)]
    runtime = load_runtime(folder)
    for name, want, got in zip(OUTPUTS, expected, runtime.run(images.numpy())):
        gap, scale = float(np.abs(got - want).max()), max(1.0, float(np.abs(want).max()))
        if not gap <= CHECK_TOLERANCE * scale:  # also a NaN gap
            raise ExportCheckError(f"the {runtime.info['format']} export computes {name} up to {gap:.3g} away "
                                   f"from PyTorch (more than {CHECK_TOLERANCE:g} x {scale:.3g}); nothing was written")


def export_graph(graph: ScoringGraph, fmt: str, out: str, info: dict[str, Any]) -> str:
    """Writes the graph in format ``fmt`` (:data:`FORMATS`) and ``detector.json`` (``info``, the
    input and output names and the scoring) to ``out``, all or nothing, once the export, run in
    its runtime, has computed what PyTorch computes (:func:`check_export`); returns the graph's
    path. The graph runs on the CPU."""
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
                    "ali_reduction": s.ali_reduction,
                    "calibration": dict(s.calibration), "format": fmt, "file": spec.file}, indent=2)
        check_export(graph, folder, images)
    return os.path.join(out, spec.file)
