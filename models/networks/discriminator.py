"""The DCGAN discriminator of DAAD+ (Hou et al., ICCV 2021, Table 8).

Example:
    >>> import torch
    >>> from models.networks import Discriminator
    >>> logit, feature = Discriminator(3, 32, 4)(torch.randn(2, 3, 32, 32))
    >>> logit.shape, feature.shape
    (torch.Size([2]), torch.Size([2, 100]))
"""
from __future__ import annotations

import torch
from torch import nn

#: Length of the discriminator's representation f_D (Table 8).
FEATURE_DIM = 100


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
