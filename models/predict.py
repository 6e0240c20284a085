"""Score images one by one: ``python -m models.predict CHECKPOINT IMAGE... [--out DIR]``.

Prints each image's anomaly score and writes its heat map to ``--out``. A single image has no set
to min-max scale over, so R and L are scaled by their range on the training images (measured when
training ended, stored in the checkpoint): normal images score about 0..1, anomalies above. The raw
R(x) and L(x) are printed too. Heat maps share the colour scale of the training images' errors.

Example:
    python -m models.predict runs/hazelnut/checkpoint.pt \\
        ../shared/data/mvtec_hazelnut_subset/test/colour/00.jpg --out runs/hazelnut/predict
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .cli import add_image_score_option, command_parser, program
from .data.images import add_pixel_limit_option, set_pixel_limit
from .inference import DEFAULT_IMAGE_SCORE, Scorer
from .inference.prediction import predict_images
from .training import load_detector
from .training.distributed import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__, __package__, "predict")
    p.add_argument("checkpoint", help=f"checkpoint.pt written by {program(__package__, 'train')}")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to score")
    p.add_argument("--out", default="predictions", help="folder for the heat maps (default: predictions)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    add_pixel_limit_option(p)
    add_image_score_option(p)
    return p


def predict(checkpoint: str, images: Sequence[str], out: str, device: str = "auto",
            image_score: str = DEFAULT_IMAGE_SCORE) -> list[dict]:
    """Scores of ``images``; writes ``<out>/<stem>_heatmap.png`` for each. With ``image_score``
    "max", R is the maximum of the map smoothed by the default sigma (scaled by its range on
    the training images too)."""
    dev = resolve_device(device)
    model, config, state = load_detector(checkpoint, dev)
    scorer = Scorer.calibrated(config, state, checkpoint, image_score)
    return predict_images(model, scorer, images, out, dev, config.model.in_channels, config.model.size)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_pixel_limit(getattr(args, "max_pixels", None))
    try:
        results = predict(args.checkpoint, args.images, args.out, args.device, args.image_score)
    except (ValueError, OSError) as e:  # OSError: missing or unreadable images
        parser.error(str(e))
    for r in results:
        extra = "" if r["feat"] is None else f"  L={r['feat']:.6g}"
        print(f"{r['image']}  score={r['score']:.4f}  R={r['rec']:.6g}{extra}  heatmap={r['heatmap']}")
    return results


if __name__ == "__main__":
    main()
