"""Pixels to the detector's input: the one resize and scaling of every path.

:func:`to_model_input` maps uint8 images of any size to the model's (B, C, S, S) in [-1, 1]. The
data sets, ``predict`` and the graph ``models.export`` writes all call it, so that an image fed to
an exported detector at its own size scores as ``predict`` scores its file.

The resize is PyTorch's antialiased bilinear one (``F.interpolate(mode="bilinear",
antialias=True, align_corners=False)``, PIL's filter) written as two matrix products,
``Wy @ x @ Wx.T``, whose weights are computed from the input's height and width. Written so, it
exports to ONNX and OpenVINO with a dynamic height and width and computes the same numbers
there: ONNX's ``Resize(antialias=1)`` is close to PyTorch's, but OpenVINO's antialiased
``Interpolate`` is not (up to 1 apart on [-1, 1] from 50x60 or 200x173 to 32x32).

Example:
    >>> import torch
    >>> from models.data.preprocess import to_model_input
    >>> to_model_input(torch.full((1, 3, 480, 640), 255, dtype=torch.uint8), 32).shape
    torch.Size([1, 3, 32, 32])
"""
from __future__ import annotations

from typing import Union

import torch

Length = Union[int, torch.SymInt]


def resize_weights(length: Length, size: int, device: torch.device) -> torch.Tensor:
    """(size, length) float32: row i holds the weights of the ``length`` input pixels in output
    pixel i of the antialiased bilinear resize (rows sum to 1)."""
    # The input length as a tensor, so that an exported graph computes the scale from its input.
    scale = torch.full((), length, dtype=torch.float32, device=device) / size
    inputs = torch.arange(length, dtype=torch.float32, device=device) + 0.5  # pixel centres
    centres = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) * scale
    # The triangle filter, widened by the scale when shrinking (the antialiasing), normalised.
    weights = (1 - (inputs - centres[:, None]).abs() / scale.clamp(min=1.0)).clamp(min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def to_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) images of any H, W -> float32 (B, C, size, size) in [-1, 1]."""
    x = images.float()
    height, width = x.shape[-2:]
    x = resize_weights(height, size, x.device) @ x @ resize_weights(width, size, x.device).T
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)
