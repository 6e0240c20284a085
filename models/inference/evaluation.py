"""Evaluating a detector on a labelled test set: ``metrics.json``, the ROC curve and heat maps.

The Python API behind ``daad-evaluate`` (:mod:`models.evaluate`): give it a loaded detector,
its test set and a :class:`~models.inference.Scorer`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data import OneClassDataset
from ..networks.acceleration import PLAIN, SpeedOptions, fast_score
from ..training.atomic import write_json
from .calibration import decision_metrics
from .metrics import defect_type
from .plots import save_heatmap, save_roc
from .scorer import BOUNDARY, Scorer
from .scores import ScoreSet, collect_scores, compute_metrics


class MetricWarning(UserWarning):
    """A metric that cannot be computed (reported as null), and why."""


def why_no_pixel_metric(scores: ScoreSet) -> str:
    """Why a scored set has no pixel AUROC: no ground-truth masks, or masks that mark nothing."""
    known = scores.mask_known.astype(bool) & (scores.labels == 1)
    if not known.any():
        return "the test set has no ground-truth masks of anomalous images"
    return (f"the {int(known.sum())} masks of anomalous test images mark no defect pixel: check how they "
            "encode the defect (read: 0/255, 0/1, 16-bit, a coloured region on black, or transparency)")


def heatmap_sample(labels: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` positions, half normal and half anomalous where there are enough, spread evenly."""
    groups = [np.flatnonzero(labels == label) for label in (0, 1)]
    normal = min(len(groups[0]), max(count // 2, count - len(groups[1])))
    takes = (normal, min(len(groups[1]), count - normal))
    return sorted(int(i) for group, take in zip(groups, takes) if take
                  for i in group[np.linspace(0, len(group) - 1, take).round().astype(int)])


def evaluate_detector(model: nn.Module, test_set: OneClassDataset, scorer: Scorer, out: str,
                      device: torch.device, batch: int = 16, num_heatmaps: int = 8, smooth: bool = False,
                      about: dict[str, Any] | None = None, speed: SpeedOptions = PLAIN,
                      decider: Optional[Scorer] = None) -> dict[str, Any]:
    """Scores ``test_set`` (``model`` run under ``speed``: :func:`~models.inference.collect_scores`),
    writes ``metrics.json`` (``about``, the metrics of :func:`~models.inference.compute_metrics`
    and every image's scores), ``roc.png`` and ``heatmaps/*.png`` to ``out``; returns what
    ``metrics.json`` holds.

    The AUROCs are those of ``scorer`` (the set scaled by its own range: they do not depend on a
    calibration). ``decider``, the checkpoint's calibrated scorer (:meth:`Scorer.decides`), gives
    each image's ``score`` (``pred_score``, as ``predict`` computes it) and ``pred_label``, and the
    metrics of its thresholds (:func:`~models.inference.calibration.decision_metrics`); without
    one, ``score`` is the set-scaled A(x) and there is no decision."""
    scores = collect_scores(model, test_set, device, scorer, batch, speed)
    metrics, image = compute_metrics(scores, scorer, smooth, names=[test_set.names[i] for i in scores.indices])
    if metrics["pixel_auroc"] is None:
        warnings.warn(f"pixel AUROC and AUPRO are null: {why_no_pixel_metric(scores)}", MetricWarning)
    metrics["calibrated"] = decider is not None
    shown = image.fused
    if decider is not None:
        decision, shown = decision_metrics(decider, scores)
        metrics.update(decision)
    os.makedirs(os.path.join(out, "heatmaps"), exist_ok=True)
    result = {**(about or {}), "num_images": len(test_set), **metrics,
              "images": [{"name": test_set.names[i], "label": int(label), "score": float(score),
                          **({"pred_label": bool(score >= BOUNDARY)} if decider is not None else {}),
                          "fused": float(a), "rec": float(r),
                          **({"feat": float(scores.feat[j])} if scores.feat is not None else {})}
                         for j, (i, label, score, a, r) in enumerate(zip(scores.indices, scores.labels, shown,
                                                                        image.fused, image.mean))]}
    write_json(os.path.join(out, "metrics.json"), result, indent=2)
    name = (about or {}).get("model", "detector")
    save_roc(scores.labels, image.fused, os.path.join(out, "roc.png"), f"{name}: image AUROC {metrics['image_auroc']:.3f}")
    draw_heatmaps(model, test_set, scores, shown, heatmap_sample(scores.labels, num_heatmaps),
                  os.path.join(out, "heatmaps"), device, speed, decider)
    return result


@torch.no_grad()
def draw_heatmaps(model: nn.Module, test_set: OneClassDataset, scores: ScoreSet, shown: np.ndarray,
                  positions: Sequence[int], folder: str, device: torch.device, speed: SpeedOptions,
                  decider: Optional[Scorer] = None) -> None:
    # One colour scale for all maps (the largest error in the set) so that they compare.
    vmax = float(scores.maps.max())
    for j in positions:
        item = test_set[int(scores.indices[j])]
        x_hat = fast_score(model, item["image"][None].to(device), speed).reconstruction[0]
        kind = "anomalous" if scores.labels[j] else "normal"
        source = test_set.names[item["index"]]
        defect = defect_type(source) if scores.labels[j] else ""  # the folder: crack, colour, ...
        name = f"{j:04d}_{kind}{'_' + defect if defect else ''}_{Path(source).stem}.png"
        predicted = None if decider is None else decider.normalise_map(scores.maps[j]) >= BOUNDARY
        save_heatmap(item["image"], x_hat, scores.maps[j], vmax, os.path.join(folder, name),
                     f"{kind}, score {shown[j]:.3f}", item["mask"][0].numpy() if item["mask_known"] else None,
                     predicted)
