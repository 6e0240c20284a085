"""What a training run measures with its networks (:class:`models.training.RunHooks`): test
metrics every few epochs, and the calibration of the scores on the training images at the end."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..data import OneClassDataset
from ..networks import AnomalyDetector
from ..training import TrainConfig
from .scorer import Scorer
from .scores import collect_scores, compute_metrics


class RunScoring:
    """The :class:`~models.training.RunHooks` of a run: its test set is built (and its files
    checked) at the first evaluation; the calibration scores the training images unflipped."""

    def __init__(self, config: TrainConfig, train_set: OneClassDataset, device: torch.device,
                 skip_bad_images: bool = False) -> None:
        self.config, self.train_set, self.device = config, train_set, device
        self.skip_bad_images = skip_bad_images
        self.scorer = Scorer.for_run(config)
        self._test_set: Optional[OneClassDataset] = None

    def evaluate(self, model: AnomalyDetector) -> dict[str, Any]:
        if self._test_set is None:
            self._test_set = self.config.dataset_split("test", skip_bad_images=self.skip_bad_images)
        scores = collect_scores(model, self._test_set, self.device, self.scorer, self.config.batch)
        metrics, _ = compute_metrics(scores, self.scorer)
        return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"]}

    def calibrate(self, model: AnomalyDetector) -> dict[str, float]:
        scores = collect_scores(model, self.train_set.without_augmentation(), self.device, self.scorer,
                                self.config.batch)
        return self.scorer.calibrate(scores.maps, scores.feat)
