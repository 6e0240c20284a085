"""The U-shaped generator of DAAD (Hou et al., ICCV 2021, Table 7), with its memories.

A plain ``nn.Module`` with no training logic (that lives in :mod:`models.training`). Choices the
paper leaves open are documented in docs/MODELS.md and at the code that makes them.

Example:
    >>> import torch
    >>> from models.networks import Generator, ModelConfig
    >>> out = Generator(ModelConfig(model="daad", size=32, width=4, division=(2, 2, 1)))(torch.randn(2, 3, 32, 32))
    >>> out.reconstruction.shape, len(out.weights)
    (torch.Size([2, 3, 32, 32]), 4)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from daad_ext import BlockMemory

from .config import DEPTH, ModelConfig


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
