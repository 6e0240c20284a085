"""Evaluate a checkpoint: ``python -m models.evaluate --checkpoint PATH --root DATA --out DIR``.

Scores the test split of the checkpoint's dataset (found under ``--root``; the other settings come
from the checkpoint) and writes to ``--out``:

* ``metrics.json``: image AUROC of the fused score A(x) (and of R and L alone), pixel AUROC and
  AUPRO where ground-truth masks exist, the best image F1 (and its threshold), the image AUROC of
  each defect type (models/inference/metrics.py), all of the test set scaled by its own range (the
  paper's protocol: they do not depend on the calibration); at the thresholds stored in the
  checkpoint (models/inference/calibration.py), the image F1, precision, recall and confusion
  counts (image_decision) and the pixel ones (pixel_decision); every image's score (pred_score,
  as daad-predict gives it: 0.5 is the threshold) and label;
* ``roc.png``: the image-level ROC curve;
* ``heatmaps/*.png``: input, reconstruction, anomaly map and mask for a sample of test images.

Example:
    python -m models.evaluate --checkpoint runs/hazelnut/checkpoint.pt \\
        --root ../shared/data/mvtec_hazelnut_subset --out runs/hazelnut/eval
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Optional, Sequence

from .cli import add_image_score_option, add_speed_option, command_parser, program
from .data.images import add_pixel_limit_option, set_pixel_limit
from .inference import DEFAULT_IMAGE_SCORE, Scorer
from .inference.evaluation import MetricWarning, evaluate_detector
from .networks.acceleration import FAST_INFERENCE, PLAIN, inference_model
from .networks.maps import ANOMALY_MAPS
from .training import TrainConfig, load_detector
from .training.distributed import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__, __package__, "evaluate")
    p.add_argument("--checkpoint", required=True, help=f"checkpoint.pt written by {program(__package__, 'train')}")
    p.add_argument("--root", help="data folder (default: the one the model was trained on)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable image files out with a warning (default: stop, listing them)")
    add_pixel_limit_option(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gamma", type=float, help="fusion weight of R (default: the checkpoint's)")
    add_image_score_option(p)
    add_speed_option(p, FAST_INFERENCE)
    p.add_argument("--anomaly-map", choices=ANOMALY_MAPS, help="pixel map to score by (default: the run's)")
    p.add_argument("--sigma", type=float, help="Gaussian sigma in pixels of --image-score max and --smooth-maps "
                                               "(default: 4 at 256x256, scaled with the input size)")
    p.add_argument("--smooth-maps", action="store_true", help="pixel AUROC of the smoothed anomaly maps")
    p.add_argument("--num-heatmaps", type=int, default=8, help="test images to draw (default: 8)")
    p.add_argument("--batch", type=int, default=16, help="evaluation batch size (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    return p


def evaluate(checkpoint: str, out: str, root: Optional[str] = None, gamma: Optional[float] = None,
             num_heatmaps: int = 8, batch: int = 16, device: str = "auto",
             skip_bad_images: bool = False, image_score: str = DEFAULT_IMAGE_SCORE,
             sigma: Optional[float] = None, smooth: bool = False,
             anomaly_map: Optional[str] = None, fast: bool = True) -> dict[str, Any]:
    """Writes metrics.json, roc.png and heat maps to ``out``; returns the metrics. ``image_score``,
    ``sigma`` and ``smooth``: see :class:`models.inference.Scorer` and
    :func:`models.inference.compute_metrics`; ``fast``: :data:`~models.networks.acceleration.FAST_INFERENCE`."""
    dev = resolve_device(device)
    model, config, state = load_detector(checkpoint, dev)
    speed = FAST_INFERENCE if fast else PLAIN
    model = inference_model(model, speed)
    test_set = config.dataset_split("test", root=root, skip_bad_images=skip_bad_images)
    scorer = Scorer.for_run(config, image_score, sigma, gamma, anomaly_map=anomaly_map)
    decider = stored_decision(config, state, checkpoint, image_score, scorer.anomaly_map)
    about = {"checkpoint": os.path.abspath(checkpoint), "model": config.model.model, "dataset": config.dataset,
             "size": config.model.size, "epoch": state["epoch"]}
    return evaluate_detector(model, test_set, scorer, out, dev, batch, num_heatmaps, smooth, about, speed, decider)


def stored_decision(config: TrainConfig, state: dict[str, Any], checkpoint: str, image_score: str,
                    anomaly_map: str) -> Optional[Scorer]:
    """The checkpoint's calibrated scorer (the run's gamma and sigma, whatever --gamma and --sigma
    say); None, with a warning, where it has no thresholds or the maps are of another kind."""
    if anomaly_map != config.anomaly_map:
        warnings.warn(f"no decision metrics: the checkpoint's thresholds are of {config.anomaly_map!r} maps, not "
                      f"{anomaly_map!r}", MetricWarning)
        return None
    try:
        return Scorer.calibrated(config, state, checkpoint, image_score)
    except ValueError as e:
        warnings.warn(f"no decision metrics, scores scaled over the test set: {e}", MetricWarning)
        return None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_pixel_limit(getattr(args, "max_pixels", None))
    try:
        result = evaluate(args.checkpoint, args.out, args.root, args.gamma, args.num_heatmaps,
                          args.batch, args.device, args.skip_bad_images, args.image_score, args.sigma,
                          args.smooth_maps, args.anomaly_map, not args.no_fast)
    except (ValueError, OSError) as e:  # OSError: missing files, an --out that cannot be written
        parser.error(str(e))
    summary = {k: result.get(k) for k in ("model", "num_images", "image_auroc", "pixel_auroc", "aupro",
                                          "image_f1", "image_decision", "image_auroc_per_defect")}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
