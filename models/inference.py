"""Scoring a whole dataset with a trained detector: raw scores, anomaly maps and metrics.

Example:
    >>> import torch
    >>> from models.config import ModelConfig
    >>> from models.networks import AnomalyDetector
    >>> from models.inference import collect_scores
    >>> from models.data import OneClassDataset
    >>> data = OneClassDataset(["a", "b"], [0, 1], 1, 32, arrays=torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    >>> net = AnomalyDetector(ModelConfig(model="ae", in_channels=1, size=32, width=4))
    >>> collect_scores(net, data, torch.device("cpu")).maps.shape
    (2, 32, 32)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_checkpoint, restore_networks, stored_config
from .config import TrainConfig
from .metrics import aupro, auroc_per_defect, best_f1
from .networks import AnomalyDetector
from .scoring import (default_sigma, fuse_scores, image_auroc, image_scores, pixel_auroc,
                      smooth_maps)


class ScoreSet(NamedTuple):
    labels: np.ndarray
    rec: np.ndarray
    feat: Optional[np.ndarray]
    #: (n, S, S) pixel anomaly maps: the squared error per pixel averaged over channels, not
    #: smoothed.
    maps: np.ndarray
    masks: np.ndarray
    #: Whether each image's mask is ground truth (see :class:`~models.data.OneClassDataset`).
    mask_known: np.ndarray
    indices: np.ndarray


@torch.no_grad()
def collect_scores(model: AnomalyDetector, dataset: Dataset, device: torch.device,
                   batch: int = 16, ali_reduction: str = "sum_sq") -> ScoreSet:
    """Raw scores of every item of ``dataset`` (in order), with the model in eval mode; L(x)
    reduced by ``ali_reduction`` (the run's ``TrainConfig.ali_loss``)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ScoreSet._fields}
    for item in DataLoader(dataset, batch_size=batch, shuffle=False):
        s = model.score(item["image"].to(device), ali_reduction)
        parts["labels"].append(item["label"].numpy())
        parts["rec"].append(s.rec.cpu().numpy())
        parts["maps"].append(s.error_map.cpu().numpy())
        parts["masks"].append(item["mask"][:, 0].numpy())
        parts["mask_known"].append(item["mask_known"].numpy())
        parts["indices"].append(item["index"].numpy())
        if s.feat is not None:
            parts["feat"].append(s.feat.cpu().numpy())
    model.train(was_training)
    return ScoreSet(**{k: np.concatenate(v) if v else None for k, v in parts.items()})


def compute_metrics(scores: ScoreSet, gamma: float, image_score: str = "mean", sigma: Optional[float] = None,
                    smooth: bool = False, names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Image AUROC of the fused score A(x) whose R is ``image_score`` of the maps (see
    :mod:`models.scoring`), and of R (the mean), of the smoothed maximum and of L alone; pixel
    AUROC and AUPRO (of the maps smoothed by ``sigma`` where ``smooth``) over the images whose mask
    is known (None where there is none, or no anomalous pixel among them); the best image F1 and,
    given the images' ``names`` (in ``scores`` order), the image AUROC of each defect type
    (:mod:`models.metrics`). ``sigma`` defaults to :func:`~models.scoring.default_sigma` of the
    maps' size."""
    sigma = default_sigma(scores.maps.shape[-1]) if sigma is None else sigma
    peak = image_scores(scores.maps, "max", sigma)
    fused = fuse_scores(scores.rec if image_score == "mean" else image_scores(scores.maps, image_score, sigma),
                        scores.feat, gamma)
    metrics: dict[str, Any] = {"gamma": gamma, "image_score": image_score, "sigma": sigma,
                               "image_auroc": image_auroc(scores.labels, fused),
                               "image_auroc_rec": image_auroc(scores.labels, scores.rec),
                               "image_auroc_max": image_auroc(scores.labels, peak)}
    if scores.feat is not None:
        metrics["image_auroc_feat"] = image_auroc(scores.labels, scores.feat)
    known = scores.mask_known
    maps = smooth_maps(scores.maps[known], sigma) if smooth else scores.maps[known]
    metrics["pixel_auroc"] = pixel_auroc(scores.masks[known], maps) if known.any() else None
    metrics["aupro"] = aupro(scores.masks[known], maps) if known.any() else None
    metrics["pixel_smoothed"] = smooth
    metrics["image_f1"], metrics["image_f1_threshold"] = best_f1(scores.labels, fused)
    if names is not None:
        metrics["image_auroc_per_defect"] = auroc_per_defect(scores.labels, fused, names)
    return metrics


def calibration(scores: ScoreSet) -> dict[str, float]:
    """Ranges of R, L and the pixel errors on normal images, to score single images later."""
    peak = image_scores(scores.maps, "max", default_sigma(scores.maps.shape[-1]))
    result = {"rec_min": float(scores.rec.min()), "rec_max": float(scores.rec.max()),
              "max_min": float(peak.min()), "max_max": float(peak.max()),
              "map_max": float(np.quantile(scores.maps, 0.999))}
    if scores.feat is not None:
        result.update(feat_min=float(scores.feat.min()), feat_max=float(scores.feat.max()))
    return result


def load_detector(path: str, device: torch.device) -> tuple[AnomalyDetector, TrainConfig, dict[str, Any]]:
    """The trained networks of a checkpoint (in eval mode), its config and the checkpoint itself."""
    state = load_checkpoint(path, map_location=device)
    config = stored_config(state, path)
    model = AnomalyDetector(config.model).to(device)
    restore_networks(model, state, path)
    return model.eval(), config, state
