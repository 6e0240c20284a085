"""Scoring a whole data set with a detector: its raw scores and anomaly maps, and their metrics.

Example:
    >>> import torch
    >>> from models.data import OneClassDataset
    >>> from models.inference import Scorer, collect_scores
    >>> from models.networks import AnomalyDetector, ModelConfig
    >>> data = OneClassDataset(["a", "b"], [0, 1], 1, 32, arrays=torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    >>> net = AnomalyDetector(ModelConfig(model="ae", in_channels=1, size=32, width=4))
    >>> collect_scores(net, data, torch.device("cpu"), Scorer()).maps.shape
    (2, 32, 32)
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..networks.acceleration import PLAIN, SpeedOptions, fast_score
from .metrics import aupro, auroc_per_defect, best_f1, image_auroc, pixel_auroc
from .scorer import ImageScores, Scorer


class ScoreSet(NamedTuple):
    labels: np.ndarray
    #: L(x) of each image, reduced as the scorer's ``ali_reduction``; None without a discriminator.
    feat: Optional[np.ndarray]
    #: (n, S, S) pixel anomaly maps: the squared error per pixel averaged over channels, not
    #: smoothed.
    maps: np.ndarray
    masks: np.ndarray
    #: Whether each image's mask is ground truth (see :class:`~models.data.OneClassDataset`).
    mask_known: np.ndarray
    indices: np.ndarray


@torch.no_grad()
def collect_scores(model: nn.Module, dataset: Dataset, device: torch.device, scorer: Scorer,
                   batch: int = 16, speed: SpeedOptions = PLAIN) -> ScoreSet:
    """Raw scores of every item of ``dataset`` (in order), with the model in eval mode, run under
    ``speed``'s context (:func:`~models.networks.acceleration.fast_score`; the model prepared by
    :func:`~models.networks.acceleration.inference_model`); ``model`` is an
    :class:`~models.networks.AnomalyDetector` or anything with its ``score``."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ScoreSet._fields}
    for item in DataLoader(dataset, batch_size=batch, shuffle=False):
        s = fast_score(model, item["image"].to(device), speed, ali_reduction=scorer.ali_reduction,
                       anomaly_map=scorer.anomaly_map)
        parts["labels"].append(item["label"].numpy())
        parts["maps"].append(s.error_map.cpu().numpy())
        parts["masks"].append(item["mask"][:, 0].numpy())
        parts["mask_known"].append(item["mask_known"].numpy())
        parts["indices"].append(item["index"].numpy())
        if s.feat is not None:
            parts["feat"].append(s.feat.cpu().numpy())
    model.train(was_training)
    return ScoreSet(**{k: np.concatenate(v) if v else None for k, v in parts.items()})


def compute_metrics(scores: ScoreSet, scorer: Scorer, smooth: bool = False,
                    names: Optional[Sequence[str]] = None) -> tuple[dict[str, Any], ImageScores]:
    """The metrics of a scored set and its image scores (those the metrics are of).

    Image AUROC of the fused score A(x) (R of the scorer's kind), and of R as the mean, of R as
    the smoothed maximum, of L alone and of A with the smoothed maximum; pixel AUROC of the raw and
    of the smoothed maps, AUPRO of both, ``pixel_auroc`` and ``aupro`` of the maps smoothed where ``smooth``, over the
    images whose mask is known (None where there is none, or no anomalous pixel among
    them); the best image F1 and, given the images' ``names`` (in ``scores`` order), the image
    AUROC of each defect type (:mod:`models.inference.metrics`). The maps are smoothed once.
    """
    smoothed = scorer.smooth(scores.maps)
    image = scorer.image_scores(scores.maps, scores.feat, smoothed)
    metrics: dict[str, Any] = {"gamma": scorer.gamma, "image_score": scorer.image_score, "sigma": scorer.sigma,
                               "anomaly_map": scorer.anomaly_map,
                               "image_auroc": image_auroc(scores.labels, image.fused),
                               "image_auroc_rec": image_auroc(scores.labels, image.mean),
                               "image_auroc_max": image_auroc(scores.labels, image.max)}
    if scores.feat is not None:
        metrics["image_auroc_feat"] = image_auroc(scores.labels, scores.feat)
        by_max = replace(scorer, image_score="max").fuse(image.max, scores.feat)
        metrics["image_auroc_fused_max"] = image_auroc(scores.labels, by_max)
    known = scores.mask_known.astype(bool)  # no known mask, or no anomalous pixel: None
    masks, raw, blurred = scores.masks[known], scores.maps[known], smoothed[known]
    metrics["pixel_auroc_raw"] = pixel_auroc(masks, raw)
    metrics["pixel_auroc_smoothed"] = pixel_auroc(masks, blurred)
    metrics["pixel_auroc"] = metrics["pixel_auroc_smoothed" if smooth else "pixel_auroc_raw"]
    metrics["aupro_raw"], metrics["aupro_smoothed"] = aupro(masks, raw), aupro(masks, blurred)
    metrics["aupro"] = metrics["aupro_smoothed" if smooth else "aupro_raw"]
    metrics["pixel_smoothed"] = smooth
    metrics["image_f1"], metrics["image_f1_threshold"] = best_f1(scores.labels, image.fused)
    if names is not None:
        metrics["image_auroc_per_defect"] = auroc_per_defect(scores.labels, image.fused, names)
    return metrics, image
