"""Score images one by one: ``python -m models.predict CHECKPOINT IMAGE... [--out DIR] [--save-maps]``.

CHECKPOINT is a checkpoint of models.train, or a folder of models.export (ONNX Runtime,
OpenVINO: bfloat16 unless --no-fast, where the CPU has it; or torch.export).
Each IMAGE is a file, a folder (its images) or a quoted glob ("shots/**/*.png"). Prints each
image's calibrated score (0..1; 0.5 is the threshold stored in the checkpoint, as daad-evaluate
and the exported graph apply it) and its label, and writes to --out its heat map (the anomaly map
normalised the same way, with a colour bar and the contour of the predicted mask), with
--save-maps its maps (.npz) and predicted mask (.png), and predictions.json (every result, and
every file that could not be read). Unreadable files are named on stderr and the others scored;
the exit status is non-zero only when no image could be scored. The Python API behind it:
models.Detector.

Example:
    python -m models.predict runs/hazelnut/checkpoint.pt \\
        ../shared/data/mvtec_hazelnut_subset/test/colour --out runs/hazelnut/predict --save-maps
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from .cli import add_image_score_option, add_speed_option, command_parser, program
from .data.images import add_pixel_limit_option, set_pixel_limit
from .inference import Detector
from .inference.runtimes import MissingExtraError
from .inference.prediction import save_predictions
from .networks.acceleration import FAST_INFERENCE
from .training.atomic import write_json

RESULTS = "predictions.json"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__, __package__, "predict")
    p.add_argument("checkpoint", help=f"checkpoint.pt written by {program(__package__, 'train')}, or a folder "
                                      f"written by {program(__package__, 'export')} (run in its runtime)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or globs to score")
    p.add_argument("--out", default="predictions", help="folder for the heat maps (default: predictions)")
    p.add_argument("--save-maps", action="store_true", help="also write each anomaly map (.npz) and predicted mask "
                                                            "(.png)")
    p.add_argument("--batch", type=int, default=16, help="images scored at a time (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    add_pixel_limit_option(p)
    add_image_score_option(p, exports=True)
    add_speed_option(p, FAST_INFERENCE)
    return p


def predict(checkpoint: str, images: Sequence[str], out: str, device: str = "auto",
            image_score: Optional[str] = None, fast: bool = True, save_maps: bool = False,
            batch: int = 16) -> dict[str, Any]:
    """Predicts ``images`` (files, folders, globs) with :class:`~models.Detector`, writes their files
    (:mod:`models.inference.prediction`) and ``<out>/predictions.json``; returns what it holds:
    ``predictions`` (a record per image) and ``failures`` (name and reason of each unreadable one)."""
    detector = Detector.load(checkpoint, device, image_score, fast, batch)
    results = detector.predict(list(images))
    report = {"checkpoint": os.path.abspath(checkpoint), "image_score": detector.scorer.image_score,
              "predictions": save_predictions(results, out, save_maps),
              "failures": [{"image": name, "reason": reason} for name, reason in results.failures]}
    write_json(os.path.join(out, RESULTS), report, indent=2)
    return report


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_pixel_limit(getattr(args, "max_pixels", None))
    try:
        report = predict(args.checkpoint, args.images, args.out, args.device, args.image_score, not args.no_fast,
                         args.save_maps, args.batch)
    except (ValueError, OSError, MissingExtraError) as e:  # ValueError: also no readable image (BadImageError)
        parser.error(str(e))
    for failure in report["failures"]:
        print(f"cannot read {failure['image']}: {failure['reason']}", file=sys.stderr)
    for r in report["predictions"]:
        print(f"{r['image']}  score={r['score']:.4f}  {r['label']}  heatmap={r['heatmap']}")
    return report


if __name__ == "__main__":
    main()
