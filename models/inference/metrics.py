"""The metrics of anomaly detection: image and pixel AUROC, and what anomalib and the MVTec AD
papers report besides them.

* :func:`aupro`: the area under the per-region-overlap curve up to a false-positive rate of 0.3,
  divided by 0.3 (Bergmann et al., IJCV 2021; anomalib's ``AUPRO``). Each connected region of
  the ground truth (8-connected) counts once whatever its size, so small defects weigh as much
  as large ones, unlike the pixel AUROC.
* :func:`best_f1`: image-level F1 at the threshold that maximises it (anomalib's ``F1Max``).
* :func:`auroc_per_defect`: image AUROC of each defect type against all normal images.

Example:
    >>> import numpy as np
    >>> from models.inference.metrics import aupro
    >>> masks = np.zeros((1, 4, 4)); masks[0, :2, :2] = 1     # one 4-pixel defect
    >>> maps = np.where(masks > 0, 0.9, 0.1)                   # found above every normal pixel
    >>> aupro(masks, maps)
    1.0
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

#: The false-positive rate AUPRO integrates up to (the MVTec AD protocol).
PRO_FPR_LIMIT = 0.3
#: 8-connectivity, as MVTec AD's evaluation code and anomalib's connected components.
CONNECTIVITY = np.ones((3, 3), dtype=bool)


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


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """(n, H, W) masks -> region ids (0: normal pixel; 1..R numbered across images) and R."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for i, mask in enumerate(masks):
        regions, count = ndimage.label(mask, structure=CONNECTIVITY)
        labels[i] = np.where(regions > 0, regions + total, 0)
        total += count
    return labels, total


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive rate and mean per-region overlap at every distinct threshold, from (0, 0).

    At threshold t the FPR is the share of normal pixels (of all images) scoring >= t, and the PRO
    the mean over ground-truth regions of the share of each region's pixels scoring >= t.
    """
    labels, regions = label_regions(np.asarray(masks) > 0.5)
    scores = np.asarray(maps, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    scores, region = scores[order], labels.ravel()[order]
    normal = region == 0
    sizes = np.bincount(region, minlength=regions + 1)
    fpr = np.cumsum(normal / normal.sum())
    pro = np.cumsum(np.where(normal, 0.0, 1.0 / (np.maximum(sizes[region], 1) * regions)))
    last = np.r_[scores[1:] != scores[:-1], True]  # equal scores pass a threshold together
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> Optional[float]:
    """Normalised area under the PRO curve for FPR in [0, ``fpr_limit``] (1 is perfect).

    ``masks`` and ``maps`` are (n, H, W); None if there is no defect region or no normal pixel.
    The curve is linear between thresholds (the trapezoid rule) and cut at ``fpr_limit``.
    """
    masks = np.asarray(masks) > 0.5
    if not masks.any() or masks.all():
        return None
    fpr, pro = pro_curve(masks, maps)
    stop = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:stop] <= fpr_limit
    x, y = fpr[:stop], pro[:stop]
    if x[-1] < fpr_limit:  # the segment that crosses the limit, cut there
        x0, x1, y0, y1 = fpr[stop - 1], fpr[stop], pro[stop - 1], pro[stop]
        x, y = np.r_[x, fpr_limit], np.r_[y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    return float(np.trapezoid(y, x) / fpr_limit)


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The largest image-level F1 over all thresholds (score >= threshold is anomalous), and that
    threshold."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]  # the last has no threshold
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def defect_type(name: str) -> str:
    """The defect type of a test image of an MVTec AD layout: its folder (``test/<type>/x.png``)."""
    return Path(name).parent.name


def auroc_per_defect(labels: np.ndarray, scores: np.ndarray,
                     names: Sequence[str]) -> dict[str, float]:
    """Image AUROC of each defect type's images against every normal image, by type name
    (none for images without a folder, as the MNIST and CIFAR-10 items)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    types = np.array([defect_type(n) for n in names])
    normal = labels == 0
    return {kind: image_auroc(labels[normal | (types == kind)], scores[normal | (types == kind)])
            for kind in sorted(set(types[labels == 1]) - {""})}
