"""Evaluate a checkpoint: ``python -m models.evaluate --checkpoint PATH --root DATA --out DIR``.

Scores the test split of the checkpoint's dataset (found under ``--root``; the other settings come
from the checkpoint) and writes to ``--out``:

* ``metrics.json``: image AUROC of the fused score A(x) (and of R and L alone), pixel AUROC and
  AUPRO where ground-truth masks exist, the best image F1 (and its threshold), the image AUROC of
  each defect type (models/metrics.py), and every image's score;
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
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .data import OneClassDataset, config_dataset
from .distributed import resolve_device
from .inference import ScoreSet, collect_scores, compute_metrics, load_detector
from .networks import AnomalyDetector
from .plots import save_heatmap, save_roc
from .scoring import IMAGE_SCORES, default_sigma, fuse_scores, image_scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by models.train")
    p.add_argument("--root", help="data folder (default: the one the model was trained on)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable image files out with a warning (default: stop, listing them)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gamma", type=float, help="fusion weight of R (default: the checkpoint's)")
    p.add_argument("--image-score", choices=IMAGE_SCORES, default="mean",
                   help="R of the image score: mean of the anomaly map (the paper) or max of the smoothed map "
                        "(anomalib; for small defects) (default: mean)")
    p.add_argument("--sigma", type=float, help="Gaussian sigma in pixels of --image-score max and --smooth-maps "
                                               "(default: 4 at 256x256, scaled with the input size)")
    p.add_argument("--smooth-maps", action="store_true", help="pixel AUROC of the smoothed anomaly maps")
    p.add_argument("--num-heatmaps", type=int, default=8, help="test images to draw (default: 8)")
    p.add_argument("--batch", type=int, default=16, help="evaluation batch size (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    return p


def heatmap_sample(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` positions, half normal and half anomalous where there are enough, spread evenly."""
    groups = [np.flatnonzero(labels == label) for label in (0, 1)]
    normal = min(len(groups[0]), max(count // 2, count - len(groups[1])))
    takes = (normal, min(len(groups[1]), count - normal))
    return sorted(int(i) for group, take in zip(groups, takes) if take
                  for i in group[np.linspace(0, len(group) - 1, take).round().astype(int)])


def evaluate(checkpoint: str, out: str, root: Optional[str] = None, gamma: Optional[float] = None,
             num_heatmaps: int = 8, batch: int = 16, device: str = "auto",
             skip_bad_images: bool = False, image_score: str = "mean", sigma: Optional[float] = None,
             smooth: bool = False) -> dict[str, Any]:
    """Writes metrics.json, roc.png and heat maps to ``out``; returns the metrics. ``image_score``,
    ``sigma`` and ``smooth``: see :func:`models.inference.compute_metrics`."""
    dev = resolve_device(device)
    model, config, state = load_detector(checkpoint, dev)
    test_set = config_dataset(config, "test", root=root, skip_bad_images=skip_bad_images)
    gamma = config.fusion_gamma if gamma is None else gamma
    sigma = default_sigma(config.model.size) if sigma is None else sigma
    scores = collect_scores(model, test_set, dev, batch, config.ali_loss)
    metrics = compute_metrics(scores, gamma, image_score, sigma, smooth,
                              names=[test_set.names[i] for i in scores.indices])
    fused = fuse_scores(image_scores(scores.maps, image_score, sigma), scores.feat, gamma)
    os.makedirs(os.path.join(out, "heatmaps"), exist_ok=True)
    result = {"checkpoint": os.path.abspath(checkpoint), "model": config.model.model,
              "dataset": config.dataset, "size": config.model.size, "epoch": state["epoch"],
              "num_images": len(test_set), **metrics,
              "images": [{"name": test_set.names[i], "label": int(label), "score": float(a),
                          "rec": float(r), **({"feat": float(scores.feat[j])} if scores.feat is not None else {})}
                         for j, (i, label, a, r) in enumerate(zip(scores.indices, scores.labels, fused, scores.rec))]}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    save_roc(scores.labels, fused, os.path.join(out, "roc.png"),
             f"{config.model.model}: image AUROC {metrics['image_auroc']:.3f}")
    draw_heatmaps(model, test_set, scores, fused, heatmap_sample(scores.labels, num_heatmaps),
                  os.path.join(out, "heatmaps"), dev)
    return result


@torch.no_grad()
def draw_heatmaps(model: AnomalyDetector, test_set: OneClassDataset, scores: ScoreSet, fused: np.ndarray, positions: Sequence[int],
                  folder: str, device: torch.device) -> None:
    # One colour scale for all maps (the largest error in the set) so that they compare.
    vmax = float(scores.maps.max())
    for j in positions:
        item = test_set[int(scores.indices[j])]
        x_hat = model.score(item["image"][None].to(device)).reconstruction[0]
        kind = "anomalous" if scores.labels[j] else "normal"
        name = f"{j:04d}_{kind}_{Path(test_set.names[item['index']]).stem}.png"
        save_heatmap(item["image"], x_hat, scores.maps[j], vmax, os.path.join(folder, name),
                     f"{kind}, score {fused[j]:.3f}", item["mask"][0].numpy() if item["mask_known"] else None)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.out, args.root, args.gamma, args.num_heatmaps,
                          args.batch, args.device, args.skip_bad_images, args.image_score, args.sigma,
                          args.smooth_maps)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    summary = {k: result[k] for k in ("model", "num_images", "image_auroc", "pixel_auroc", "aupro",
                                      "image_f1", "image_auroc_per_defect")}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
