"""The one place that turns anomaly maps and feature distances into image scores (paper Sec. 3.4).

A(x) = gamma * R(x) + (1 - gamma) * L(x), with R and L each min-max scaled to [0, 1]: over the
scored set itself (the paper's protocol), or by the ranges of a calibration measured on held-out
normal images (to score images one at a time). A calibration (:mod:`.calibration`) also holds the
decision: an image threshold of A(x) and a pixel threshold of the map, each with the span that
normalises it as anomalib does, ``(value - threshold) / span + 0.5`` clipped to [0, 1], so that
0.5 is the boundary between normal and anomalous (:func:`normalise`). :meth:`Scorer.score` and
:meth:`Scorer.score_torch` return that ``pred_score``, :meth:`Scorer.fuse` the raw A(x).

R is the image score of the pixel anomaly map (:mod:`models.networks.maps`: the squared error per
pixel, or SSIM's): ``"mean"``, its mean (the paper's R), or ``"max"``, the maximum of the map
smoothed by a Gaussian of ``sigma`` pixels (anomalib's image score: a small defect is not drowned
by the background's error). L is the feature distance, reduced as the run's L_ali
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
#: The calibration's decision on each image score: the threshold of A(x) and its normalising span.
DECISION_KEYS = {"mean": ("image_threshold_mean", "image_span_mean"),
                 "max": ("image_threshold_max", "image_span_max")}
#: The calibration's decision on the pixels of the (raw, unsmoothed) anomaly map.
PIXEL_KEYS = ("pixel_threshold", "pixel_span")
#: The normalised value that is the boundary: anomalous at or above it (anomalib's).
BOUNDARY = 0.5


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


def normalise(values: np.ndarray, threshold: float, span: float) -> np.ndarray:
    """anomalib's normalisation of scores or maps: ``threshold`` goes to 0.5, a ``span`` above it to
    1 (clipped to [0, 1]); a value is anomalous where the result is >= :data:`BOUNDARY`."""
    return np.clip((np.asarray(values, dtype=np.float64) - threshold) / span + BOUNDARY, 0.0, 1.0)


def normalise_torch(values: torch.Tensor, threshold: float, span: float) -> torch.Tensor:
    """:func:`normalise` in torch (plain arithmetic in an exported graph)."""
    return ((values - threshold) / span + BOUNDARY).clamp(0.0, 1.0)


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

    ``calibration`` (a dict of plain floats, as checkpoints store it: :mod:`.calibration`) fixes the
    ranges that scale R and L and, where it has them, the thresholds that normalise the scores and
    maps (:meth:`decides`); without it each set is scaled by its own range.
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
        for name in ("gamma", "sigma"):  # the thresholds hold only for the scoring they were measured with
            measured = (self.calibration or {}).get(name)
            if measured is not None and abs(measured - getattr(self, name)) > 1e-9:
                raise ValueError(f"the calibration's thresholds were measured with {name} {measured:g}, not "
                                 f"{getattr(self, name):g}: score with the run's {name}, or calibrate again")

    @property
    def decides(self) -> bool:
        """Whether the calibration holds the thresholds of this image score and of the pixels (a
        calibration written before thresholds existed has ranges only)."""
        keys = (*DECISION_KEYS[self.image_score], *PIXEL_KEYS)
        return self.calibration is not None and all(k in self.calibration for k in keys)

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
                             f"end, or measure one with python -m models.calibrate --checkpoint {source} "
                             "--normal-dir FOLDER_OF_NORMAL_IMAGES")
        try:
            scorer = cls.for_run(config, image_score, calibration=calibration)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        if not scorer.decides:
            raise ValueError(f"{source} has a calibration without decision thresholds (written before they "
                             "existed): add them with python -m models.calibrate --checkpoint "
                             f"{source} --normal-dir FOLDER_OF_NORMAL_IMAGES")
        return scorer

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
        """The score of each map of ``maps`` (n, H, W) with its feature distance: A(x), normalised
        to ``pred_score`` (0.5 the boundary) where the scorer :meth:`decides`."""
        fused = self.image_scores(maps, feat).fused
        return normalise(fused, *self.decision()) if self.decides else fused

    def decision(self, pixels: bool = False) -> tuple[float, float]:
        """The calibration's threshold and span of A(x) with this image score, or of the pixels."""
        threshold, span = PIXEL_KEYS if pixels else DECISION_KEYS[self.image_score]
        return self.calibration[threshold], self.calibration[span]

    def normalise_map(self, maps: np.ndarray) -> np.ndarray:
        """Raw anomaly maps normalised by the pixel threshold: a pixel is anomalous at >= 0.5."""
        return normalise(maps, *self.decision(pixels=True))

    def normalise_map_torch(self, maps: torch.Tensor) -> torch.Tensor:
        """:meth:`normalise_map` in torch (for an exported graph)."""
        return normalise_torch(maps, *self.decision(pixels=True))

    def calibrate(self, maps: np.ndarray, feat: Optional[np.ndarray]) -> dict[str, float]:
        """The ranges of both R and of L on a set of normal images: the part of a calibration that
        scales A(x) (:func:`~models.inference.calibration.calibrate` adds the thresholds)."""
        s = self.image_scores(maps, None)
        result = {"rec_min": float(s.mean.min()), "rec_max": float(s.mean.max()),
                  "max_min": float(s.max.min()), "max_max": float(s.max.max())}
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
        fused = self.fuse_torch(error_map, feat)
        return normalise_torch(fused, *self.decision()) if self.decides else fused

    def fuse_torch(self, error_map: torch.Tensor, feat: Optional[torch.Tensor]) -> torch.Tensor:
        """A(x) in torch (:meth:`fuse` of the maps' R)."""
        if self.image_score == "mean":
            r = error_map.flatten(1).mean(dim=1)
        else:
            r = self.smooth_torch(error_map).flatten(1).amax(dim=1)
        score = min_max_torch(r, *self._range(self.image_score))
        if feat is None:
            return score
        return self.gamma * score + (1.0 - self.gamma) * min_max_torch(feat, *self._range("feat"))
