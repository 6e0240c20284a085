"""The detector: the generator plus, for the "+" variants, the discriminator, and its raw scores.

Example:
    >>> import torch
    >>> from models.networks import AnomalyDetector, ModelConfig
    >>> net = AnomalyDetector(ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1))).eval()
    >>> s = net.score(torch.zeros(2, 3, 32, 32))
    >>> s.error_map.shape, s.feat.shape
    (torch.Size([2, 32, 32]), torch.Size([2]))
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

from daad_ext import BlockMemory

from .config import MEAN_IMAGE, ModelConfig
from .discriminator import Discriminator
from .generator import Generator
from . import maps
from .baseline import MeanImageGenerator
from .losses import feature_distance


class Scores(NamedTuple):
    reconstruction: torch.Tensor
    #: (B, H, W) the pixel anomaly map (:mod:`models.networks.maps`: by default the squared error
    #: per pixel, averaged over channels).
    error_map: torch.Tensor
    #: R(x): the mean of the map, (B,).
    rec: torch.Tensor
    #: L(x): the distance of f_D(x) and f_D(x_hat), reduced as the run's L_ali, (B,); None
    #: without a discriminator.
    feat: Optional[torch.Tensor]


class AnomalyDetector(nn.Module):
    """Generator plus, for the "+" variants, the discriminator; ``score`` gives the raw scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = (Generator(config) if config.learns
                          else MeanImageGenerator(torch.zeros(config.in_channels, config.size, config.size)))
        self.discriminator = (Discriminator(config.in_channels, config.size, config.width)
                              if config.variant.adversarial else None)

    def memories(self) -> list[BlockMemory]:
        return list(self.generator.memories.values())

    @torch.no_grad()
    def score(self, x: torch.Tensor, ali_reduction: str = "sum_sq", anomaly_map: str = "l2") -> Scores:
        """Raw (unscaled) anomaly scores of a batch in [-1, 1]; run in eval mode. The map is
        ``anomaly_map`` (:mod:`models.networks.maps`); L(x) is reduced as L_ali was in training
        (``TrainConfig.ali_loss``, see :mod:`models.networks.losses`)."""
        x_hat = self.generator(x).reconstruction
        error_map = maps.anomaly_map(x, x_hat, anomaly_map)
        feat = None
        if self.discriminator is not None:
            # One pass over x and x_hat together: in eval mode each image's features are its own,
            # and the discriminator's large weights are read (and reordered by oneDNN) once.
            real, fake = self.discriminator(torch.cat([x, x_hat]))[1].chunk(2)
            feat = feature_distance(real, fake, ali_reduction)
        return Scores(x_hat, error_map, error_map.flatten(1).mean(dim=1), feat)


def fit_mean_image(dataset: Sequence[dict[str, Any]]) -> AnomalyDetector:
    """The detector that learns nothing, fitted to ``dataset`` (its images' channels and size)."""
    channels, size, _ = dataset[0]["image"].shape
    model = AnomalyDetector(ModelConfig(model=MEAN_IMAGE, in_channels=channels, size=size))
    model.generator.fit(dataset)
    return model.eval()
