"""Pixel anomaly maps of a reconstruction: the squared error (``"l2"``, the paper's) or the
structural dissimilarity (``"ssim"``, Bergmann et al., VISAPP 2019: on textures it sees changes
of local structure that a per-pixel error averages away).

SSIM is computed per pixel over an 11 x 11 Gaussian window (sigma 1.5, Wang et al. 2004),
reflected at the border, and averaged over channels; the map is (1 - SSIM) / 2, in [0, 1], 0 where
the reconstruction is perfect. The images, in [-1, 1], are compared as intensities in [0, 1]:
SSIM's luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) assumes non-negative means.
On [-1, 1] itself, windows of mid-grey (means near 0) would make it swing with a change of
brightness of 1% (two windows of means +0.01 and -0.01 score 1/3), as on most magnetic-tile
images.

Example:
    >>> import torch
    >>> from models.networks.maps import anomaly_map
    >>> x = torch.rand(1, 3, 16, 16) * 2 - 1
    >>> float(anomaly_map(x, x, "ssim").abs().max()) < 1e-6, anomaly_map(x, -x, "l2").shape
    (True, torch.Size([1, 16, 16]))
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.nn.functional as F

ANOMALY_MAPS = ("l2", "ssim")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
#: SSIM's stabilisers (K1 = 0.01, K2 = 0.03) for intensities in [0, 1] (data range 1).
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2


def check_map(kind: str) -> None:
    if kind not in ANOMALY_MAPS:
        raise ValueError(f"unknown anomaly map {kind!r}; choose one of {ANOMALY_MAPS}")


def _window_mean(x: torch.Tensor) -> torch.Tensor:
    """The Gaussian-weighted mean of every pixel's window, per channel, same size as ``x``."""
    half = SSIM_WINDOW // 2
    taps = torch.tensor([math.exp(-0.5 * ((i - half) / SSIM_SIGMA) ** 2) for i in range(SSIM_WINDOW)],
                        dtype=x.dtype, device=x.device)
    taps = taps / taps.sum()
    channels = x.shape[1]
    x = F.pad(x, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def without_autocast(device_type: str) -> ContextManager:
    """Autocast off where it is on; a plain context otherwise, so that an exported graph (traced
    without autocast) holds no autocast node."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of two batches (B, C, H, W) in [-1, 1], averaged over channels: (B, H, W),
    in float32 at least, also under autocast: the variances are differences of window means of
    about 0.25, which in bfloat16 (3 digits) come out negative as often as not, and SSIM's
    denominator near 0 (infinite maps)."""
    with without_autocast(x.device.type):
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        x, y = (x.to(dtype) + 1) / 2, (y.to(dtype) + 1) / 2  # intensities in [0, 1]: see the module docstring
        mu_x, mu_y = _window_mean(x), _window_mean(y)
        var_x = _window_mean(x * x) - mu_x ** 2
        var_y = _window_mean(y * y) - mu_y ** 2
        cov = _window_mean(x * y) - mu_x * mu_y
        value = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
                 / ((mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)))
        return value.mean(dim=1)


def anomaly_map(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """(B, H, W): the squared error averaged over channels (``"l2"``) or (1 - SSIM) / 2 (``"ssim"``)."""
    if kind == "l2":
        return (x - x_hat).pow(2).mean(dim=1)
    check_map(kind)
    return (1 - ssim(x, x_hat)) / 2
