"""Export a detector: ``python -m models.export --checkpoint CK --format onnx|openvino|pt2 --out DIR``.

Writes one self-contained graph that maps a batch of images as decoded, uint8 (B, H, W, C) of
any height and width (C = 3, or 1 for grayscale models), to

* ``anomaly_map`` (B, S, S): the raw pixel map (the squared error averaged over channels, or
  SSIM's), which ``models.predict`` normalises by the calibration's pixel threshold and span
  (both in ``detector.json``) for its heat map;
* ``score`` (B,): the calibrated ``pred_score`` in [0, 1] (0.5 the decision boundary), exactly
  as ``models.predict`` computes it.

The resize to S and the scaling to [-1, 1] of ``models.predict``
(:func:`models.data.preprocess.to_model_input`), the generator, the discriminator's features
(for the "+" variants) and the scoring are all in the graph (:mod:`models.inference.graph`), so
an image fed at its own size scores as ``predict`` scores its file. ONNX Runtime, OpenVINO or
``torch.export.load`` need neither daad_ext nor this package; :func:`models.inference.runtimes.load_runtime`
runs any of them. Beside it, ``detector.json`` records the model's size and channels, the input's
layout, the scoring and its calibration and the output names. The batch, height and width are
dynamic. The folder is written all or nothing, once the graph, run in its runtime on images of
another size, has computed what PyTorch computes (maps and scores within 1e-4 of the largest).
``onnx`` needs the ``[onnx]`` extra, ``openvino`` (OpenVINO's IR, ``detector.xml`` and ``.bin``)
the ``[openvino]`` extra.

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
from .inference.graph import FORMATS, ScoringGraph, export_graph, require_format
from .inference.runtimes import MissingExtraError
from .training import load_detector


def export(checkpoint: str, fmt: str, out: str, image_score: str = DEFAULT_IMAGE_SCORE) -> str:
    """Writes the graph of format ``fmt`` and ``detector.json`` to ``out``; returns the graph's path."""
    require_format(fmt)  # before the checkpoint is read: a missing package fails at once
    model, config, state = load_detector(checkpoint, torch.device("cpu"))
    scorer = Scorer.calibrated(config, state, checkpoint, image_score)
    info = {"checkpoint": os.path.abspath(checkpoint), "model": config.model.model}
    return export_graph(ScoringGraph(model, scorer), fmt, out, info)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__, __package__, "export")
    p.add_argument("--checkpoint", required=True, help=f"checkpoint.pt written by {program(__package__, 'train')}")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime; extra [onnx]), openvino "
                   "(OpenVINO's IR; extra [openvino]) or pt2 (torch.export.load)")
    p.add_argument("--out", required=True, help="output folder")
    add_image_score_option(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.format, args.out, args.image_score)
    except (ValueError, OSError, MissingExtraError) as e:  # OSError: also an --out that cannot be written
        parser.error(str(e))
    print(path)
    return path


if __name__ == "__main__":
    main()
