"""The calibration of a detector's scores: measured once on held-out images, stored in the
checkpoint, used by every path (``evaluate``, ``predict``, :class:`~models.inference.Detector`,
the exported graph), so that one image gets one score and one label everywhere.

A calibration (a dict of plain floats) holds:

* the ranges of R and L on the normal images, which scale them into A(x), and the heat maps'
  colour scale (:meth:`~models.inference.Scorer.calibrate`);
* for each image score (mean and max), the threshold of A(x): its :data:`NORMAL_QUANTILE` over
  the normal images, or, given abnormal images too, the threshold of the best F1 (anomalib's
  adaptive threshold); and the span (largest minus smallest A(x) of the set) that normalises it;
* the pixel threshold of the raw anomaly map, the :data:`PIXEL_QUANTILE` of the normal images'
  pixels or, given masks of abnormal images, the best pixel F1; and its span;
* the ``gamma`` and ``sigma`` the thresholds hold for.

The scores and maps are then normalised as anomalib does (:func:`~models.inference.scorer.normalise`):
``(value - threshold) / span + 0.5`` clipped to [0, 1], so that 0.5 is the decision boundary.

Example:
    >>> import numpy as np
    >>> from models.inference import ScoreSet, Scorer
    >>> from models.inference.calibration import calibrate
    >>> maps = np.random.default_rng(0).random((8, 16, 16))
    >>> normal = ScoreSet(np.zeros(8), None, maps, np.zeros_like(maps), np.ones(8, bool), np.arange(8))
    >>> scorer = Scorer(image_score="mean", calibration=calibrate(Scorer(), normal))
    >>> labels = scorer.score(maps, None) >= 0.5       # the top 1% of the normal images' A(x)
    >>> int(labels.sum())
    1
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .metrics import best_f1
from .scorer import BOUNDARY, DECISION_KEYS, IMAGE_SCORES, PIXEL_KEYS, Scorer
from .scores import ScoreSet

#: Quantile of the normal images' A(x) that is the image threshold without abnormal images: 1% of
#: normal images like them are flagged.
NORMAL_QUANTILE = 0.99
#: Quantile of the normal images' pixels that is the pixel threshold without masks.
PIXEL_QUANTILE = 0.999


def image_threshold(fused: np.ndarray, labels: np.ndarray) -> float:
    """The best-F1 threshold of A(x) where some images are anomalous, else the
    :data:`NORMAL_QUANTILE` of the (normal) images' A(x)."""
    return best_f1(labels, fused)[1] if labels.any() else float(np.quantile(fused, NORMAL_QUANTILE))


def span(values: np.ndarray) -> float:
    """The range that normalises ``values``; a set of equal values gets a unit span."""
    width = float(np.max(values) - np.min(values))
    return width if width > 0 else 1.0


def calibrate(scorer: Scorer, scores: ScoreSet) -> dict[str, float]:
    """The calibration (see the module docstring) of ``scorer``'s run measured on a scored set:
    normal images (label 0) and, if any, abnormal ones (label 1) with their masks where known."""
    labels = np.asarray(scores.labels).astype(bool)
    if labels.all():
        raise ValueError("a calibration needs normal images: every image given is labelled anomalous")
    normal = ~labels
    feat = None if scores.feat is None else scores.feat[normal]
    result = scorer.calibrate(scores.maps[normal], feat)
    for kind in IMAGE_SCORES:
        fused = replace(scorer, image_score=kind, calibration=result).image_scores(scores.maps, scores.feat).fused
        keys = DECISION_KEYS[kind]
        result[keys[0]], result[keys[1]] = image_threshold(fused, labels), span(fused)
    known = np.asarray(scores.mask_known).astype(bool)
    masks = scores.masks[known] > 0.5
    if masks.any():
        result[PIXEL_KEYS[0]] = best_f1(masks.ravel(), scores.maps[known].ravel())[1]
    else:
        result[PIXEL_KEYS[0]] = float(np.quantile(scores.maps[normal], PIXEL_QUANTILE))
    result[PIXEL_KEYS[1]] = span(scores.maps)
    result.update(gamma=float(scorer.gamma), sigma=float(scorer.sigma))
    return result


def decision_counts(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """F1, precision, recall and the confusion counts (tp, fp, tn, fn) of boolean decisions
    against the truth; a ratio without a denominator is None."""
    truth, predicted = np.asarray(truth, bool).ravel(), np.asarray(predicted, bool).ravel()
    tp, fp = int((truth & predicted).sum()), int((~truth & predicted).sum())
    fn, tn = int((truth & ~predicted).sum()), int((~truth & ~predicted).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def decision_metrics(scorer: Scorer, scores: ScoreSet) -> tuple[dict[str, Any], np.ndarray]:
    """The calibrated ``pred_score`` of each image of a scored set (``scorer`` :meth:`~Scorer.decides`)
    and the metrics of the stored thresholds: image F1, precision, recall and confusion counts
    (``image_decision``), and pixel F1 and counts over the images whose mask is known
    (``pixel_decision``, None without any defect pixel)."""
    pred_scores = scorer.score(scores.maps, scores.feat)
    metrics: dict[str, Any] = {"image_threshold": scorer.decision()[0], "pixel_threshold": scorer.decision(True)[0],
                               "image_decision": decision_counts(scores.labels, pred_scores >= BOUNDARY)}
    known = np.asarray(scores.mask_known).astype(bool)
    masks = scores.masks[known] > 0.5
    metrics["pixel_decision"] = (decision_counts(masks, scorer.normalise_map(scores.maps[known]) >= BOUNDARY)
                                 if masks.any() else None)
    return metrics, pred_scores
