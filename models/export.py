"""Export a detector: ``python -m models.export --checkpoint CK --format onnx|pt2 --out DIR``.

Writes one self-contained graph that maps a batch of images (B, C, S, S), prepared as
:func:`models.data.load_image` does (resized to S, scaled to [-1, 1]), to

* ``anomaly_map`` (B, S, S): the squared pixel error averaged over channels (the heat map of
  ``models.predict``, whose colour scale ``map_max`` is in ``detector.json``);
* ``score`` (B,): the fused score A(x), R and L scaled by their range on the training images,
  exactly as ``models.predict`` computes it (normal images about 0..1, anomalies above).

The generator, the discriminator's features (for the "+" variants) and the scoring are all in
the graph; the block-wise memories are written in standard operators (daad_ext/export.py), so
ONNX Runtime, OpenVINO or ``torch.export.load`` need neither daad_ext nor this package. Beside it,
``detector.json`` records the input size and channels, the calibration and the output names. The
batch size is dynamic.

Example:
    python -m models.export --checkpoint runs/hazelnut/checkpoint.pt --format onnx --out runs/hazelnut/onnx
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional, Sequence

import torch
from torch import nn

from daad_ext.export import decompose

from .atomic import atomic_write, write_json
from .inference import load_detector
from .networks import AnomalyDetector

FORMATS = {"onnx": "detector.onnx", "pt2": "detector.pt2"}
OUTPUTS = ("anomaly_map", "score")
#: ONNX opset of the exported graph (ONNX Runtime 1.17+ and OpenVINO 2024+ run it).
OPSET = 18


def scaled(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """:func:`models.scoring.min_max` with a fixed range, in the graph."""
    span = high - low
    return (values - low) / span if span > 0 else torch.zeros_like(values)


class ScoringGraph(nn.Module):
    """The detector with the scoring of ``models.predict``: image -> (anomaly map, score)."""

    def __init__(self, model: AnomalyDetector, gamma: float, calibration: dict[str, float],
                 ali_reduction: str) -> None:
        super().__init__()
        self.model, self.gamma, self.calibration = model.eval(), gamma, calibration
        self.ali_reduction = ali_reduction  # L(x) reduced as L_ali was in training

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, c = self.model.score(x, self.ali_reduction), self.calibration
        score = scaled(s.rec, c["rec_min"], c["rec_max"])
        if s.feat is not None:
            score = self.gamma * score + (1.0 - self.gamma) * scaled(s.feat, c["feat_min"], c["feat_max"])
        return s.error_map, score


def scoring_graph(checkpoint: str) -> tuple[ScoringGraph, dict[str, Any]]:
    """The graph to export (on the CPU) and the description written beside it."""
    model, config, state = load_detector(checkpoint, torch.device("cpu"))
    for memory in model.memories():  # exported on the CPU: a checkpoint trained with --backend cuda too
        memory.backend = "auto"
    calib = state.get("calibration")
    if calib is None:
        raise ValueError(f"{checkpoint} has no calibration (its training did not finish): resume it "
                         "to the end before exporting")
    m = config.model
    info = {"checkpoint": os.path.abspath(checkpoint), "model": m.model, "in_channels": m.in_channels,
            "size": m.size, "input": "image", "input_range": [-1.0, 1.0], "outputs": list(OUTPUTS),
            "gamma": config.fusion_gamma, "calibration": calib}
    return ScoringGraph(model, config.fusion_gamma, calib, config.ali_loss), info


def export_program(graph: ScoringGraph, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the graph with a dynamic batch, the memories in standard operators."""
    batch = torch.export.Dim.DYNAMIC
    with torch.no_grad():
        return decompose(torch.export.export(graph, (example,), dynamic_shapes={"x": {0: batch}}))


def export(checkpoint: str, fmt: str, out: str) -> str:
    """Writes ``<out>/detector.onnx`` or ``detector.pt2`` and ``detector.json``; returns the graph's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {tuple(FORMATS)}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    graph, info = scoring_graph(checkpoint)
    example = torch.zeros(2, info["in_channels"], info["size"], info["size"])
    program = export_program(graph, example)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FORMATS[fmt])
    if fmt == "pt2":
        atomic_write(path, lambda f: torch.export.save(program, f))
    else:
        onnx_program = torch.onnx.export(program, (example,), input_names=[info["input"]],
                                         output_names=list(OUTPUTS), opset_version=OPSET, dynamo=True,
                                         verbose=False)
        atomic_write(path, lambda f: f.write(onnx_program.model_proto.SerializeToString()))
    write_json(os.path.join(out, "detector.json"), {**info, "format": fmt, "file": FORMATS[fmt]}, indent=2)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by models.train")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime, OpenVINO) or "
                   "pt2 (torch.export.load)")
    p.add_argument("--out", required=True, help="output folder")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.format, args.out)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(path)
    return path


if __name__ == "__main__":
    main()
