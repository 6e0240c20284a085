"""Export a detector: ``python -m models.export --checkpoint CK --format onnx|pt2 --out DIR``.

Writes one self-contained graph that maps a batch of images (B, C, S, S), prepared as
:func:`models.data.load_image` does (resized to S, scaled to [-1, 1]), to

* ``anomaly_map`` (B, S, S): the squared pixel error averaged over channels (the heat map of
  ``models.predict``, whose colour scale ``map_max`` is in ``detector.json``);
* ``score`` (B,): the fused score A(x), R (``--image-score``) and L scaled by their range on the
  training images, exactly as ``models.predict`` computes it (normal images about 0..1, anomalies
  above).

The generator, the discriminator's features (for the "+" variants) and the scoring are all in
the graph (:mod:`models.inference.graph`); ONNX Runtime, OpenVINO or ``torch.export.load`` need
neither daad_ext nor this package. Beside it, ``detector.json`` records the input size and
channels, the scoring and its calibration and the output names. The batch size is dynamic.

Example:
    python -m models.export --checkpoint runs/hazelnut/checkpoint.pt --format onnx --out runs/hazelnut/onnx
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

from .cli import add_image_score_option, command_parser, program
from .inference import DEFAULT_IMAGE_SCORE, Scorer
from .inference.graph import FORMATS, ScoringGraph, export_graph
from .training import load_detector


def export(checkpoint: str, fmt: str, out: str, image_score: str = DEFAULT_IMAGE_SCORE) -> str:
    """Writes ``<out>/detector.onnx`` or ``detector.pt2`` and ``detector.json``; returns the graph's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {tuple(FORMATS)}")
    model, config, state = load_detector(checkpoint, torch.device("cpu"))
    scorer = Scorer.calibrated(config, state, checkpoint, image_score)
    info = {"checkpoint": os.path.abspath(checkpoint), "model": config.model.model}
    return export_graph(ScoringGraph(model, scorer), fmt, out, info)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__, __package__, "export")
    p.add_argument("--checkpoint", required=True, help=f"checkpoint.pt written by {program(__package__, 'train')}")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime, OpenVINO) or "
                   "pt2 (torch.export.load)")
    p.add_argument("--out", required=True, help="output folder")
    add_image_score_option(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.format, args.out, args.image_score)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(path)
    return path


if __name__ == "__main__":
    main()
