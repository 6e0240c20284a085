"""The detector that learns nothing: every image "reconstructed" as the mean training image
(``--model mean-image``).

A detector has learned something about the normal images beyond their average only where it
beats this one. It is an :class:`~models.networks.AnomalyDetector` whose generator is the mean
image, scored exactly as the models are (:meth:`~models.networks.AnomalyDetector.score`): the pixel
map is the squared difference to the per-pixel mean of the training images, averaged over
channels, and R(x) its mean. It is fitted, not trained (:func:`~models.networks.fit_mean_image`).

Example:
    >>> import torch
    >>> from models.networks import fit_mean_image
    >>> train = [{"image": torch.zeros(3, 8, 8)}, {"image": torch.ones(3, 8, 8)}]
    >>> fit_mean_image(train).score(torch.ones(1, 3, 8, 8)).rec
    tensor([0.2500])
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .generator import GeneratorOutput

class MeanImageGenerator(nn.Module):
    """A "generator" whose every output is the same image (a buffer); it has no memories."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.memories = nn.ModuleDict()  # as the generator's: none

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        return GeneratorOutput(self.mean.expand_as(x), [])

    @torch.no_grad()
    def fit(self, dataset: Sequence[dict[str, Any]]) -> None:
        """The per-pixel mean of ``dataset``'s images (accumulated in float64: order-independent to
        rounding, so the baseline is the same on every machine)."""
        total = sum(dataset[i]["image"].double() for i in range(len(dataset)))
        self.mean.copy_(total / len(dataset))

