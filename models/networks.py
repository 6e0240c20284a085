"""The networks of DAAD (Hou et al., ICCV 2021): the generator (Table 7) and the discriminator (Table 8).

Plain ``nn.Module`` s with no training logic (that lives in :mod:`models.trainer`). Choices the
paper leaves open are documented in docs/MODELS.md and at the code that makes them.

Example:
    >>> import torch
    >>> from models.config import ModelConfig
    >>> from models.networks import AnomalyDetector
    >>> net = AnomalyDetector(ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1)))
    >>> out = net.generator(torch.randn(2, 3, 32, 32))
    >>> out.reconstruction.shape, len(out.weights)
    (torch.Size([2, 3, 32, 32]), 4)
    >>> logit, feature = net.discriminator(out.reconstruction)
    >>> logit.shape, feature.shape
    (torch.Size([2]), torch.Size([2, 100]))
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from daad_ext import BlockMemory

from .config import DEPTH, ModelConfig
from .losses import feature_distance

#: Length of the discriminator's representation f_D (Table 8).
FEATURE_DIM = 100


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias: BatchNorm follows), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class GeneratorOutput(NamedTuple):
    reconstruction: torch.Tensor
    #: Addressing weights (B, Q, N) of each memory, in the order of ``Generator.memory_scales``.
    weights: list[torch.Tensor]


class Generator(nn.Module):
    """The U-shaped generator of Table 7 with optional memories and skip connections.

    Encoder: four stages of two ConvBNReLU and a 2x2 max-pool (widths w, 2w, 4w, 8w). The pooled
    output of stage k (at H / 2**(k+1)) is read from its memory where the variant has one; the
    encoder continues from the pooled features, not from the memory output. The bottleneck (two
    ConvBNReLU at 16w) takes the H/16 memory output. Four 2x2 stride-2 transposed convolutions
    bring the map back to H; after each of the first three (at H/8, H/4, H/2) the memory output of
    that scale is concatenated (with skips) and two ConvBNReLU follow. At H no memory exists, so
    the fourth up-sampling is followed by the head: two ConvBNReLU and a 1x1 conv to the image
    channels, with no output activation (Table 7 lists none; the target is in [-1, 1]).
    Decoder widths mirror the encoder: 4w, 2w, w at H/8, H/4, H/2, and w at H.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        w, size = config.width, config.size
        widths = [w * 2 ** k for k in range(DEPTH)]
        self.skip = config.variant.skip
        self.encoder = nn.ModuleList(double_conv(c_in, c) for c_in, c in
                                     zip([config.in_channels] + widths[:-1], widths))
        self.pool = nn.MaxPool2d(2)
        self.memory_scales = config.memory_scales()
        # ModuleDict keys must be strings; the key is the scale index k.
        self.memories = nn.ModuleDict({
            str(k): BlockMemory(widths[k], size >> (k + 1), size >> (k + 1), **config.memory_options(k))
            for k in self.memory_scales})
        self.bottleneck = double_conv(widths[-1], 2 * widths[-1])
        up_widths = widths[-2::-1] + [w]  # 4w, 2w, w at H/8..H/2, then w at H
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, c, 2, stride=2) for c_in, c in
                                zip([2 * widths[-1]] + up_widths[:-1], up_widths))
        self.decoder = nn.ModuleList(double_conv(c * (2 if self.skip else 1), c) for c in up_widths[:-1])
        self.head = nn.Sequential(ConvBNReLU(w, w), ConvBNReLU(w, w), nn.Conv2d(w, config.in_channels, 1))

    def read_memory(self, k: int, features: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """The memory output of pooled map ``k`` (the features themselves without a memory)."""
        if str(k) not in self.memories:
            return features
        out, w = self.memories[str(k)](features, return_weights=True)
        weights.append(w)
        return out

    def forward(self, x: torch.Tensor) -> GeneratorOutput:
        weights: list[torch.Tensor] = []
        skips = []
        h = x
        for k, stage in enumerate(self.encoder):
            h = self.pool(stage(h))
            # Only the maps a later layer reads are passed through their memory.
            if k == DEPTH - 1:
                h_mem = self.read_memory(k, h, weights)
            elif self.skip:
                skips.append(self.read_memory(k, h, weights))
        h = self.bottleneck(h_mem)
        for up, stage, skip in zip(self.up[:-1], self.decoder, reversed(skips) if self.skip else [None] * 3):
            h = up(h)
            h = stage(h if skip is None else torch.cat([h, skip], dim=1))
        return GeneratorOutput(self.head(self.up[-1](h)), weights)


class Discriminator(nn.Module):
    """The DCGAN discriminator of Table 8, returning its logit and the 100-d representation f_D.

    4x4 stride-2 convolutions with LeakyReLU(0.2) and BatchNorm (none after the first), widths
    doubling from w, while the map is at least 8 pixels wide: six at 256x256, leaving 4x4. A conv
    whose kernel covers the remaining map (4x4 at power-of-two sizes; 4..7 otherwise, which
    Table 8 does not cover) gives f_D; a 3x3 conv (padding 1) on the 1x1 map gives the logit.
    The sigmoid of Table 8 is folded into the loss (``binary_cross_entropy_with_logits``) for
    numerical stability: ``torch.sigmoid(logit)`` is the probability of "real".
    """

    def __init__(self, in_channels: int, size: int, width: int, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c, side = in_channels, width, size
        while side >= 8:
            layers.append(nn.Conv2d(c_in, c, 4, stride=2, padding=1, bias=not layers))
            if len(layers) > 1:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in, c, side = c, 2 * c, side // 2
        self.features = nn.Sequential(*layers, nn.Conv2d(c_in, feature_dim, side))
        self.classifier = nn.Conv2d(feature_dim, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.features(x)
        return self.classifier(feature).flatten(), feature.flatten(1)


class Scores(NamedTuple):
    reconstruction: torch.Tensor
    #: (B, H, W) squared error per pixel, averaged over channels: the pixel anomaly map.
    error_map: torch.Tensor
    #: R(x): the mean squared pixel error, (B,).
    rec: torch.Tensor
    #: L(x): the distance of f_D(x) and f_D(x_hat), reduced as the run's L_ali, (B,); None
    #: without a discriminator.
    feat: Optional[torch.Tensor]


class AnomalyDetector(nn.Module):
    """Generator plus, for the "+" variants, the discriminator; ``score`` gives the raw scores."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = (Discriminator(config.in_channels, config.size, config.width)
                              if config.variant.adversarial else None)

    def memories(self) -> list[BlockMemory]:
        return list(self.generator.memories.values())

    @torch.no_grad()
    def score(self, x: torch.Tensor, ali_reduction: str = "sum_sq") -> Scores:
        """Raw (unscaled) anomaly scores of a batch in [-1, 1]; run in eval mode. L(x) is reduced
        as L_ali was in training (``TrainConfig.ali_loss``, see :mod:`models.losses`)."""
        x_hat = self.generator(x).reconstruction
        error_map = (x - x_hat).pow(2).mean(dim=1)
        feat = None
        if self.discriminator is not None:
            feat = feature_distance(self.discriminator(x)[1], self.discriminator(x_hat)[1], ali_reduction)
        return Scores(x_hat, error_map, error_map.flatten(1).mean(dim=1), feat)
