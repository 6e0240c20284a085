"""The one place that turns anomaly maps and feature distances into image scores (paper Sec. 3.4).

A(x) = gamma * R(x) + (1 - gamma) * L(x), with R and L each min-max scaled to [0, 1]: over the
scored set itself (the paper's protocol), or by the ranges of a calibration measured on the
training images (to score images one at a time). R is the image score of the pixel anomaly map
(:mod:`models.networks.maps`: the squared error per pixel, or SSIM's): ``"mean"``, its mean (the paper's R), or ``"max"``, the maximum of
the map smoothed by a Gaussian of ``sigma`` pixels (anomalib's image score: a small defect is not
drowned by the background's error). L is the feature distance, reduced as the run's L_ali
(``ali_reduction``).

:class:`Scorer` owns these choices and has two implementations that agree (tested): NumPy, in
float64, for evaluation and the study, and torch, for single images and the exported graph.

Example:
    >>> import numpy as np
    >>> from models.inference import Scorer
    >>> Scorer(gamma=0.9).fuse(np.array([1.0, 2.0, 3.0]), np.array([0.0, 10.0, 5.0])).round(3)
    array([0.  , 0.55, 0.95])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ..networks.maps import check_map

if TYPE_CHECKING:
    from ..training import TrainConfig

IMAGE_SCORES = ("mean", "max")
#: The image score of evaluation, prediction and export unless told otherwise: the smoothed
#: maximum was at or above the paper's mean on every data set tried, and the mean ranked normal
#: images highest on textures (docs/RESULTS.md); ``"mean"`` stays the paper's reading.
DEFAULT_IMAGE_SCORE = "max"
#: anomalib's Gaussian sigma (4 pixels at 256x256), scaled with the input size.
SIGMA_AT_256 = 4.0
#: scipy's and anomalib's kernel reach: the Gaussian is cut at 4 sigma.
TRUNCATE = 4.0
#: The calibration's range of each raw score: its (low, high) keys.
RANGE_KEYS = {"mean": ("rec_min", "rec_max"), "max": ("max_min", "max_max"), "feat": ("feat_min", "feat_max")}
#: Quantile of the training images' pixel errors that fixes the heat maps' colour scale.
MAP_QUANTILE = 0.999


def default_sigma(size: int) -> float:
    """anomalib's sigma of 4 pixels at 256x256, scaled to ``size`` (1 pixel at 64x64)."""
    return SIGMA_AT_256 * size / 256


def min_max(values: np.ndarray, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """Scales ``values`` to [0, 1] by their own range, or by ``low`` and ``high`` where given.

    A set whose values are all equal scales to zeros (there is no range to divide by).
    """
    values = np.asarray(values, dtype=np.float64)
    low = values.min() if low is None else low
    high = values.max() if high is None else high
    span = high - low
    return (values - low) / span if span > 0 else np.zeros_like(values)


def min_max_torch(values: torch.Tensor, low: Optional[float] = None, high: Optional[float] = None) -> torch.Tensor:
    """:func:`min_max` in torch; with a fixed range, plain arithmetic in an exported graph."""
    if low is not None and high is not None:
        span = high - low
        return (values - low) / span if span > 0 else torch.zeros_like(values)
    low_t, high_t = values.min(), values.max()
    span_t = high_t - low_t
    safe = torch.where(span_t > 0, span_t, torch.ones_like(span_t))
    return torch.where(span_t > 0, (values - low_t) / safe, torch.zeros_like(values))


def gaussian_taps(sigma: float) -> np.ndarray:
    """scipy's 1-d Gaussian kernel: 2 * int(4 sigma + 0.5) + 1 taps, summing to 1."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def reflected_indices(length: int, radius: int) -> np.ndarray:
    """Indices of a line padded by ``radius`` on both sides in scipy's "reflect" mode
    (d c b a | a b c d | d c b a), for any radius."""
    i = np.arange(-radius, length + radius) % (2 * length)
    return np.where(i < length, i, 2 * length - 1 - i)


class ImageScores(NamedTuple):
    """The raw image scores of a set and the fused score A(x) (see :class:`Scorer`)."""

    #: R as the mean of the map (the paper's).
    mean: np.ndarray
    #: R as the maximum of the smoothed map (anomalib's).
    max: np.ndarray
    #: A(x) with the scorer's R.
    fused: np.ndarray


@dataclass(frozen=True)
class Scorer:
    """How maps and feature distances become image scores (see the module docstring).

    ``calibration`` (a dict of plain floats, as checkpoints store it: :meth:`calibrate`) fixes the
    ranges that scale R and L; without it each set is scaled by its own range.
    """

    gamma: float = 1.0
    image_score: str = DEFAULT_IMAGE_SCORE
    sigma: float = 1.0
    ali_reduction: str = "sum_sq"
    anomaly_map: str = "l2"
    calibration: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"unknown image score {self.image_score!r}; choose one of {IMAGE_SCORES}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        check_map(self.anomaly_map)
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.calibration is not None and RANGE_KEYS[self.image_score][0] not in self.calibration:
            raise ValueError(f"the calibration has no range of the {self.image_score!r} image score (it was "
                             "measured before that score existed): use the image score 'mean'")

    @classmethod
    def for_run(cls, config: "TrainConfig", image_score: str = DEFAULT_IMAGE_SCORE, sigma: Optional[float] = None,
                gamma: Optional[float] = None, calibration: Optional[Mapping[str, float]] = None,
                anomaly_map: Optional[str] = None) -> "Scorer":
        """The scorer of a run: its gamma, its L_ali reduction, its anomaly map and sigma by its
        input size, each unless given."""
        return cls(gamma=config.fusion_gamma if gamma is None else gamma, image_score=image_score,
                   sigma=default_sigma(config.model.size) if sigma is None else sigma,
                   ali_reduction=config.ali_loss, anomaly_map=anomaly_map or config.anomaly_map,
                   calibration=calibration)

    @classmethod
    def calibrated(cls, config: "TrainConfig", state: Mapping, source: str,
                   image_score: str = DEFAULT_IMAGE_SCORE) -> "Scorer":
        """The scorer of a checkpoint's run (``state``, read from ``source``) with its stored
        calibration, to score images one at a time."""
        calibration = state.get("calibration")
        if calibration is None:
            raise ValueError(f"{source} has no calibration (its training did not finish): resume it to the "
                             "end, or use daad-evaluate on a test set")
        try:
            return cls.for_run(config, image_score, calibration=calibration)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def _range(self, name: str) -> tuple[Optional[float], Optional[float]]:
        if self.calibration is None:
            return None, None
        low, high = RANGE_KEYS[name]
        return self.calibration[low], self.calibration[high]

    # NumPy, float64 --------------------------------------------------------------------------

    def smooth(self, maps: np.ndarray) -> np.ndarray:
        """Each (H, W) map of ``maps`` (n, H, W) blurred by the Gaussian (reflected at the border)."""
        maps = np.asarray(maps, dtype=np.float64)
        if self.sigma == 0:
            return maps
        return gaussian_filter(maps, sigma=(0, self.sigma, self.sigma), mode="reflect", truncate=TRUNCATE)

    def image_scores(self, maps: np.ndarray, feat: Optional[np.ndarray],
                     smoothed: Optional[np.ndarray] = None) -> ImageScores:
        """R both ways and A(x) of a set (``smoothed``: :meth:`smooth` of ``maps``, if already made)."""
        maps = np.asarray(maps, dtype=np.float64)
        smoothed = self.smooth(maps) if smoothed is None else smoothed
        mean = maps.reshape(len(maps), -1).mean(axis=1)
        peak = smoothed.reshape(len(maps), -1).max(axis=1)
        return ImageScores(mean, peak, self.fuse(mean if self.image_score == "mean" else peak, feat))

    def fuse(self, r: np.ndarray, feat: Optional[np.ndarray]) -> np.ndarray:
        """A(x) from the raw R (of the scorer's kind) and L; scaled R alone without L."""
        score = min_max(r, *self._range(self.image_score))
        if feat is None:
            return score
        return self.gamma * score + (1.0 - self.gamma) * min_max(feat, *self._range("feat"))

    def score(self, maps: np.ndarray, feat: Optional[np.ndarray]) -> np.ndarray:
        """A(x) of each map of ``maps`` (n, H, W) with its feature distance."""
        return self.image_scores(maps, feat).fused

    def calibrate(self, maps: np.ndarray, feat: Optional[np.ndarray]) -> dict[str, float]:
        """The ranges of both R and of L on a set of normal images (the training images), and the
        heat maps' colour scale (a high quantile of their pixel errors): a checkpoint's calibration."""
        s = self.image_scores(maps, None)
        result = {"rec_min": float(s.mean.min()), "rec_max": float(s.mean.max()),
                  "max_min": float(s.max.min()), "max_max": float(s.max.max()),
                  "map_max": float(np.quantile(maps, MAP_QUANTILE))}
        if feat is not None:
            result.update(feat_min=float(np.min(feat)), feat_max=float(np.max(feat)))
        return result

    # torch ----------------------------------------------------------------------------------

    def smooth_torch(self, maps: torch.Tensor) -> torch.Tensor:
        """:meth:`smooth` in torch: (B, H, W) -> (B, H, W), separable, traceable for export."""
        if self.sigma == 0:
            return maps
        taps = torch.as_tensor(gaussian_taps(self.sigma), dtype=maps.dtype, device=maps.device)
        radius = (len(taps) - 1) // 2
        height, width = maps.shape[-2:]
        rows = torch.as_tensor(reflected_indices(height, radius), device=maps.device)
        cols = torch.as_tensor(reflected_indices(width, radius), device=maps.device)
        x = maps[:, None].index_select(3, cols)
        x = F.conv2d(x, taps.view(1, 1, 1, -1))
        x = x.index_select(2, rows)
        return F.conv2d(x, taps.view(1, 1, -1, 1))[:, 0]

    def score_torch(self, error_map: torch.Tensor, feat: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`score` in torch, from a batch of maps (B, H, W) and feature distances (B,)."""
        if self.image_score == "mean":
            r = error_map.flatten(1).mean(dim=1)
        else:
            r = self.smooth_torch(error_map).flatten(1).amax(dim=1)
        score = min_max_torch(r, *self._range(self.image_score))
        if feat is None:
            return score
        return self.gamma * score + (1.0 - self.gamma) * min_max_torch(feat, *self._range("feat"))
