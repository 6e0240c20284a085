"""The detector that learns nothing: every image "reconstructed" as the mean training image.

A detector has learned something about the normal images beyond their average only where it
beats this one. It is scored exactly as the models are (:meth:`AnomalyDetector.score`): the pixel
map is the squared difference to the per-pixel mean of the training images, averaged over
channels, and R(x) its mean.

Example:
    >>> import torch
    >>> from models.networks import MeanImage
    >>> train = [{"image": torch.zeros(3, 8, 8)}, {"image": torch.ones(3, 8, 8)}]
    >>> MeanImage.fit(train).score(torch.ones(1, 3, 8, 8)).rec
    tensor([0.2500])
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .detector import AnomalyDetector
from .generator import GeneratorOutput


class MeanImageGenerator(nn.Module):
    """A "generator" whose every output is the same image; it has no memories."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        return GeneratorOutput(self.mean.expand_as(x), [])


class MeanImage(nn.Module):
    """The mean training image as a detector with the models' interface (``generator``, ``score``)."""

    discriminator = None
    score = AnomalyDetector.score

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.generator = MeanImageGenerator(mean)

    @classmethod
    def fit(cls, dataset: Sequence[dict[str, Any]]) -> "MeanImage":
        """The per-pixel mean of ``dataset``'s images (accumulated in float64: order-independent
        to rounding, so the baseline is the same on every machine)."""
        total = sum(dataset[i]["image"].double() for i in range(len(dataset)))
        return cls((total / len(dataset)).float())
