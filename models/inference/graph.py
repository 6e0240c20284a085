"""The detector as one exportable graph: a batch of images -> (anomaly map, calibrated score).

The generator, the discriminator's features (for the "+" variants) and the scoring of a
calibrated :class:`~models.inference.Scorer` (either image score) are all in the graph; the
block-wise memories are written in standard operators (daad_ext/export.py), so ONNX Runtime,
OpenVINO or ``torch.export.load`` need neither daad_ext nor this package. The Python API behind
``daad-export`` (:mod:`models.export`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from daad_ext.export import decompose

from ..networks import AnomalyDetector
from ..training.atomic import atomic_write, write_json
from .scorer import Scorer

FORMATS = {"onnx": "detector.onnx", "pt2": "detector.pt2"}
OUTPUTS = ("anomaly_map", "score")
#: ONNX opset of the exported graph (ONNX Runtime 1.17+ and OpenVINO 2024+ run it).
OPSET = 18


class ScoringGraph(nn.Module):
    """The detector with the scoring of ``daad-predict``: image -> (anomaly map, score)."""

    def __init__(self, model: AnomalyDetector, scorer: Scorer) -> None:
        super().__init__()
        if scorer.calibration is None:
            raise ValueError("an exported graph scores images one at a time: it needs a calibrated scorer")
        self.model, self.scorer = model.eval(), scorer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.model.score(x, self.scorer.ali_reduction, self.scorer.anomaly_map)
        return s.error_map, self.scorer.score_torch(s.error_map, s.feat)


def export_program(graph: ScoringGraph, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the graph with a dynamic batch, the memories in standard operators."""
    batch = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        return decompose(torch.export.export(graph, (example,), dynamic_shapes={"x": {0: batch}}))


def export_graph(graph: ScoringGraph, fmt: str, out: str, info: dict[str, Any]) -> str:
    """Writes ``<out>/detector.onnx`` or ``detector.pt2`` and ``detector.json`` (``info``, the input
    and output names and the scoring); returns the graph's path. The graph runs on the CPU."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {tuple(FORMATS)}")
    model = graph.model.cpu()
    for memory in model.memories():  # exported on the CPU: a checkpoint trained with --backend cuda too
        memory.backend = "auto"
    size, channels = model.config.size, model.config.in_channels
    example = torch.zeros(2, channels, size, size)
    program = export_program(graph, example)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FORMATS[fmt])
    if fmt == "pt2":
        atomic_write(path, lambda f: torch.export.save(program, f))
    else:
        onnx_program = torch.onnx.export(program, (example,), input_names=["image"], output_names=list(OUTPUTS),
                                         opset_version=OPSET, dynamo=True, verbose=False)
        atomic_write(path, lambda f: f.write(onnx_program.model_proto.SerializeToString()))
    s = graph.scorer
    write_json(os.path.join(out, "detector.json"),
               {**info, "in_channels": channels, "size": size, "input": "image", "input_range": [-1.0, 1.0],
                "outputs": list(OUTPUTS), "gamma": s.gamma, "image_score": s.image_score, "sigma": s.sigma,
                "anomaly_map": s.anomaly_map,
                "calibration": dict(s.calibration), "format": fmt, "file": FORMATS[fmt]}, indent=2)
    return path
