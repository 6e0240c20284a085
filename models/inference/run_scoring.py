"""What a training run measures with its networks (:class:`models.training.RunHooks`): the
validation error every epoch, test metrics every few epochs, the calibration of the scores at the
end (on the held-out validation images, else the training images), the learning curves, and a
warning when the model has not learnt."""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import OneClassDataset
from ..networks import AnomalyDetector
from ..networks.acceleration import PLAIN, SpeedOptions, inference_model
from ..training import TrainConfig
from .calibration import calibrate
from .plots import save_learning_curves
from .scorer import Scorer
from .scores import collect_scores, compute_metrics

#: A reconstruction whose variance is below this share of the input's is flat: the decoder still
#: outputs (nearly) one grey image, whatever the input.
FLAT_VARIANCE_RATIO = 0.1
#: Seed of the fixed test subset of ``eval_subset``.
SUBSET_SEED = 0


class UntrainedWarning(UserWarning):
    """A run ended without having learnt the images: flat reconstructions, worse than each image's
    mean brightness (squared-error runs), or a validation error no lower than after its first epoch."""


def fixed_test_subset(labels: list[int], count: int) -> list[int]:
    """``count`` positions of a test set, the same every time, with normal and anomalous images in
    their proportion (at least one of each where both exist)."""
    rng = np.random.default_rng(SUBSET_SEED)
    groups = [np.flatnonzero(np.asarray(labels) == label) for label in (0, 1)]
    anomalous = min(len(groups[1]), max(1, round(count * len(groups[1]) / len(labels)))) if len(groups[1]) else 0
    takes = (min(len(groups[0]), count - anomalous), anomalous)
    return sorted(int(i) for group, take in zip(groups, takes) for i in rng.permutation(group)[:take])


@torch.no_grad()
def reconstruction_statistics(model: AnomalyDetector, dataset: OneClassDataset, device: torch.device,
                              batch: int, anomaly_map: str = "l2") -> dict[str, float]:
    """Over ``dataset``: the mean of the ``anomaly_map`` (``error``; the squared error by default),
    the variance of the reconstructions as a share of the inputs' (``variance_ratio``) and the share
    of the inputs' variance the reconstructions explain, 1 - squared error / variance
    (``explained``: below 0 a flat image of each input's mean brightness would do better); per
    image, then averaged."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"error": [], "variance_ratio": [], "explained": []}
    for item in DataLoader(dataset, batch_size=batch, shuffle=False):
        x = item["image"].to(device)
        s = model.score(x, anomaly_map=anomaly_map)
        variance = x.flatten(1).var(dim=1, unbiased=False).clamp_min(1e-12)
        squared_error = (x - s.reconstruction).pow(2).flatten(1).mean(dim=1)
        parts["error"].append(s.rec.cpu())
        parts["variance_ratio"].append((s.reconstruction.flatten(1).var(dim=1, unbiased=False) / variance).cpu())
        parts["explained"].append((1 - squared_error / variance).cpu())
    model.train(was_training)
    return {key: float(torch.cat(values).mean()) for key, values in parts.items()}


class RunScoring:
    """The :class:`~models.training.RunHooks` of a run. Its validation and test sets are built (and
    their files checked) when first needed; the calibration scores the validation images (held out
    from training) where the run has them, else the training images unflipped.
    Test metrics and calibration run the model as ``speed`` says (as prediction will)."""

    def __init__(self, config: TrainConfig, train_set: OneClassDataset, device: torch.device,
                 skip_bad_images: bool = False, speed: SpeedOptions = PLAIN) -> None:
        self.config, self.train_set, self.device = config, train_set, device
        self.skip_bad_images, self.speed = skip_bad_images, speed
        self.scorer = Scorer.for_run(config)
        self._sets: dict[str, OneClassDataset] = {}

    def _set(self, split: str) -> OneClassDataset:
        if split not in self._sets:
            data = self.config.dataset_split(split, skip_bad_images=self.skip_bad_images)
            if split == "test" and self.config.eval_subset and self.config.eval_subset < len(data):
                data = data.subset(fixed_test_subset(data.labels, self.config.eval_subset))
            self._sets[split] = data
        return self._sets[split]

    def evaluate(self, model: AnomalyDetector) -> dict[str, Any]:
        scores = collect_scores(inference_model(model, self.speed), self._set("test"), self.device, self.scorer,
                                self.config.batch, self.speed)
        metrics, _ = compute_metrics(scores, self.scorer)
        keys = ("image_auroc", "image_auroc_max", "pixel_auroc", "pixel_auroc_smoothed")
        return {key: metrics[key] for key in keys}

    def validate(self, model: AnomalyDetector) -> dict[str, float]:
        # The map the run is scored by: a run trained by SSIM may raise its squared error while
        # the structure it learns still improves, and would stop at a false plateau.
        return {"val_error": reconstruction_statistics(model, self._set("val"), self.device, self.config.batch,
                                                       self.scorer.anomaly_map)["error"]}

    def calibrate(self, model: AnomalyDetector) -> dict[str, float]:
        scores = collect_scores(inference_model(model, self.speed), self._normal_images(), self.device,
                                self.scorer, self.config.batch, self.speed)
        return calibrate(self.scorer, scores)

    def _normal_images(self) -> OneClassDataset:
        """The held-out normal images: the validation split, else the training images unflipped."""
        return self._set("val") if self.config.val_ratio else self.train_set.without_augmentation()

    def finish(self, model: AnomalyDetector, history: list[dict[str, Any]], out: str) -> None:
        stats = reconstruction_statistics(model, self._normal_images(), self.device, self.config.batch)
        why = []
        if stats["variance_ratio"] < FLAT_VARIANCE_RATIO:
            why.append(f"its reconstructions are flat (their variance is {stats['variance_ratio']:.0%} of the "
                       f"images'; a model that has learnt them reaches {FLAT_VARIANCE_RATIO:.0%} or more)")
        # SSIM is blind to a change of brightness by design: a run scored by it may explain none of
        # the images' variance in squared error and still score by the structure it has learnt.
        if stats["explained"] < 0 and self.scorer.anomaly_map == "l2":
            why.append(f"its reconstruction error is {1 - stats['explained']:.1f}x the images' own variance (a flat "
                       "image of each one's mean brightness would do better)")
        advice = "Train longer (--steps, --until-plateau) before reading its scores"
        # A run that reconstructs its held-out images no better than after one epoch has not
        # learnt them, whatever its training losses say: DAAD+ by SSIM under the paper's weights
        # made L_ali drive the generator, and its validation error rose from 0.29 to 0.47.
        validated = [h for h in history if "val_error" in h]
        if len(validated) > 1 and validated[-1]["val_error"] >= validated[0]["val_error"]:
            first, last = validated[0], validated[-1]
            why.append(f"its validation error did not fall ({first['val_error']:.3g} at epoch {first['epoch']}, "
                       f"{last['val_error']:.3g} at epoch {last['epoch']})")
            advice += ("; if the validation error still does not fall, another loss term drives the generator "
                       "(grad_share in train_log.jsonl says which): re-weight the losses (--losses, --loss-weights)")
        if why:
            warnings.warn(f"the run in {out} looks untrained after step {history[-1].get('step')}: "
                          f"{'; '.join(why)}. {advice}", UntrainedWarning)
        save_learning_curves(history, os.path.join(out, "learning_curves.png"))
