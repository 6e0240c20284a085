"""Anomaly scores and metrics: min-max scaling, the fused score A(x), image and pixel AUROC.

A(x) = gamma * R(x) + (1 - gamma) * L(x), with R and L (the feature distance, reduced as the
run's L_ali) each min-max scaled to [0, 1] over the evaluated set (paper Sec. 3.4). R is the
image score of the pixel anomaly map (the squared error per pixel): ``"mean"``, its mean (the
paper's R), or ``"max"``, the maximum of the map smoothed by a Gaussian (anomalib's image score:
a small defect is not drowned by the background's error). Pixel maps may be smoothed the same
way before the pixel AUROC.

Example:
    >>> import numpy as np
    >>> from models.scoring import fuse_scores
    >>> fuse_scores(np.array([1.0, 2.0, 3.0]), np.array([0.0, 10.0, 5.0]), gamma=0.9).round(3)
    array([0.  , 0.55, 0.95])
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score, roc_curve

IMAGE_SCORES = ("mean", "max")
#: anomalib's Gaussian sigma (4 pixels at 256x256), scaled with the input size.
SIGMA_AT_256 = 4.0


def default_sigma(size: int) -> float:
    """anomalib's sigma of 4 pixels at 256x256, scaled to ``size`` (1 pixel at 64x64)."""
    return SIGMA_AT_256 * size / 256


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Each (H, W) map of ``maps`` (n, H, W) blurred by a Gaussian of ``sigma`` pixels (truncated at
    4 sigma, reflected at the border, as anomalib's kernel of 2 * int(4 sigma + 0.5) + 1 taps)."""
    maps = np.asarray(maps, dtype=np.float64)
    return gaussian_filter(maps, sigma=(0, sigma, sigma), mode="reflect", truncate=4.0) if sigma > 0 else maps


def image_scores(maps: np.ndarray, how: str = "mean", sigma: float = 1.0) -> np.ndarray:
    """One score per anomaly map: its mean (R, the paper) or the maximum of its smoothed copy
    (anomalib)."""
    if how not in IMAGE_SCORES:
        raise ValueError(f"unknown image score {how!r}; choose one of {IMAGE_SCORES}")
    maps = np.asarray(maps, dtype=np.float64)
    if how == "mean":
        return maps.reshape(len(maps), -1).mean(axis=1)
    return smooth_maps(maps, sigma).reshape(len(maps), -1).max(axis=1)


def min_max(values: np.ndarray, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """Scales ``values`` to [0, 1] by their own range, or by ``low`` and ``high`` where given.

    A set whose values are all equal scales to zeros (there is no range to divide by).
    """
    values = np.asarray(values, dtype=np.float64)
    low = values.min() if low is None else low
    high = values.max() if high is None else high
    span = high - low
    return (values - low) / span if span > 0 else np.zeros_like(values)


def fuse_scores(rec: np.ndarray, feat: Optional[np.ndarray], gamma: float,
                rec_range: Optional[tuple[float, float]] = None,
                feat_range: Optional[tuple[float, float]] = None) -> np.ndarray:
    """A(x) = gamma * scaled R + (1 - gamma) * scaled L; just scaled R without ``feat``.

    The ranges default to the set's own (the paper's protocol); :mod:`models.predict` passes the
    ranges measured on the training images instead, to score images one at a time.
    """
    score = min_max(rec, *(rec_range or (None, None)))
    if feat is None:
        return score
    return gamma * score + (1.0 - gamma) * min_max(feat, *(feat_range or (None, None)))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (label 1 = anomalous); raises if only one class is present."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("AUROC needs both normal and anomalous images in the evaluated set")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> Optional[float]:
    """Pixel-level AUROC over all pixels of all images; None if no pixel is anomalous."""
    truth = np.asarray(masks).reshape(-1) > 0.5
    if not truth.any():
        return None
    return float(roc_auc_score(truth, np.asarray(maps).reshape(-1)))


def image_roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the image-level ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr
