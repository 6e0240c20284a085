"""models/inference: the one scorer (NumPy and torch against each other and against hand-computed
values), image and pixel AUROC, and the metrics of a scored set."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from models.inference import ScoreSet, Scorer, compute_metrics, default_sigma
from models.inference.metrics import image_auroc, pixel_auroc
from models.inference.scorer import min_max

pytestmark = pytest.mark.usefixtures("single_thread")


def score_set(labels, maps, masks=None, feat=None, known=None) -> ScoreSet:
    n = len(labels)
    masks = np.zeros_like(maps) if masks is None else masks
    return ScoreSet(np.asarray(labels), feat, maps, masks, np.ones(n, bool) if known is None else known, np.arange(n))


def test_fusion_against_hand_computed_values():
    rec = np.array([2.0, 4.0, 3.0, 6.0])  # scaled: 0, 0.5, 0.25, 1
    feat = np.array([10.0, 30.0, 50.0, 20.0])  # scaled: 0, 0.5, 1, 0.25
    expected = [0.0, 0.9 * 0.5 + 0.1 * 0.5, 0.9 * 0.25 + 0.1 * 1.0, 0.9 * 1.0 + 0.1 * 0.25]
    np.testing.assert_allclose(Scorer(gamma=0.9).fuse(rec, feat), expected)
    np.testing.assert_allclose(Scorer(gamma=0.9).fuse(rec, None), [0, 0.5, 0.25, 1])  # no discriminator: R only
    np.testing.assert_allclose(Scorer(gamma=0.0).fuse(rec, feat), [0, 0.5, 1, 0.25])
    # A calibration's fixed ranges (single images): values outside the range go outside [0, 1].
    calibrated = Scorer(gamma=0.5, image_score="mean",
                        calibration={"rec_min": 2, "rec_max": 6, "feat_min": 10, "feat_max": 50})
    np.testing.assert_allclose(calibrated.fuse(np.array([8.0]), np.array([0.0])), [0.5 * 1.5 + 0.5 * -0.25])


def test_min_max_of_a_constant_set_is_zero():
    np.testing.assert_array_equal(min_max(np.array([3.0, 3.0])), [0.0, 0.0])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown image score"):
        Scorer(image_score="median")
    with pytest.raises(ValueError, match="gamma must be in"):
        Scorer(gamma=1.5)
    with pytest.raises(ValueError, match="no range of the 'max' image score"):
        Scorer(image_score="max", calibration={"rec_min": 0.0, "rec_max": 1.0})


def test_auroc():
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc(np.array([0, 0]), np.array([0.1, 0.2]))
    masks = np.zeros((2, 2, 2))
    assert pixel_auroc(masks, np.random.rand(2, 2, 2)) is None
    masks[1, 0, 0] = 1
    maps = np.zeros((2, 2, 2))
    maps[1, 0, 0] = 5
    assert pixel_auroc(masks, maps) == 1.0


def test_gaussian_smoothing_against_a_direct_sum():
    maps = np.zeros((1, 21, 21))
    maps[0, 10, 10] = 1.0
    sigma = 1.5
    smoothed = Scorer(sigma=sigma).smooth(maps)[0]
    offsets = np.arange(-6, 7)  # the kernel reaches 4 sigma = 6 pixels: all of it fits the map
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    expected = np.zeros((21, 21))
    expected[4:17, 4:17] = np.outer(kernel, kernel)
    np.testing.assert_allclose(smoothed, expected, atol=1e-12)
    assert np.array_equal(Scorer(sigma=0.0).smooth(maps), maps)
    assert default_sigma(256) == 4.0 and default_sigma(64) == 1.0


@pytest.mark.parametrize("sigma, size", [(1.0, 16), (1.5, 9), (4.0, 5), (0.6, 7)])
def test_torch_smoothing_equals_scipy_at_the_border_too(sigma, size):
    """Radii up to beyond the map itself (sigma 4 on 5 pixels: a radius of 16) reflect as scipy's."""
    maps = np.random.default_rng(1).random((3, size, size + 2))
    expected = gaussian_filter(maps, sigma=(0, sigma, sigma), mode="reflect", truncate=4.0)
    got = Scorer(sigma=sigma).smooth_torch(torch.from_numpy(maps)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("image_score", ["mean", "max"])
@pytest.mark.parametrize("with_feat", [False, True])
@pytest.mark.parametrize("calibrated", [False, True])
def test_numpy_and_torch_scorers_agree(image_score, with_feat, calibrated):
    rng = np.random.default_rng(0)
    maps = rng.random((6, 16, 16)) ** 3
    feat = rng.random(6) * 50 if with_feat else None
    calibration = None
    if calibrated:  # measured on other (normal) images: the scored ones fall partly outside
        calibration = Scorer(sigma=1.0).calibrate(rng.random((4, 16, 16)) ** 3, rng.random(4) * 50)
    scorer = Scorer(gamma=0.7, image_score=image_score, sigma=1.0, calibration=calibration)
    expected = scorer.score(maps, feat)
    got = scorer.score_torch(torch.from_numpy(maps), None if feat is None else torch.from_numpy(feat))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)  # both in float64 here
    got32 = scorer.score_torch(torch.from_numpy(maps).float(), None if feat is None else torch.from_numpy(feat).float())
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=1e-5)  # what the graph computes


def test_the_max_score_finds_a_small_defect_that_the_mean_misses():
    """Textures with small defects: a normal image with background error everywhere has the
    larger mean; the defective one a small bright spot, which the smoothed maximum sees."""
    normal = np.full((16, 16), 0.2)
    defect = np.full((16, 16), 0.1)
    defect[7:9, 7:9] = 1.0
    scores = Scorer(sigma=1.0).image_scores(np.stack([normal, defect]), None)
    assert scores.mean.argmax() == 0 and scores.max.argmax() == 1


def test_pixel_auroc_leaves_out_images_whose_mask_is_unknown():
    maps = np.zeros((3, 2, 2))
    maps[0, 0, 0] = maps[2, 1, 1] = 1.0  # image 2's hot pixel would be a false positive ...
    masks = np.zeros((3, 2, 2))
    masks[0, 0, 0] = 1
    scores = score_set([1, 0, 1], maps, masks, known=np.array([True, True, False]))
    metrics, _ = compute_metrics(scores, Scorer(image_score="mean", sigma=0.0))
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] == 1.0  # ... but its mask is unknown, so it does not count
    assert compute_metrics(scores._replace(mask_known=np.ones(3, bool)), Scorer(sigma=0.0))[0]["pixel_auroc"] < 1.0
    assert compute_metrics(scores._replace(mask_known=np.zeros(3, bool)), Scorer(sigma=0.0))[0]["pixel_auroc"] is None


def test_metrics_with_the_max_score_and_smoothed_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 16, 16)) * 0.1
    masks = np.zeros((4, 16, 16))
    maps[2:, 5:7, 5:7] += 1.0
    masks[2:, 5:7, 5:7] = 1
    maps[:2] += 0.2  # normal images: more background error, a larger mean
    scores = score_set([0, 0, 1, 1], maps, masks)
    by_mean, mean_scores = compute_metrics(scores, Scorer(image_score="mean", sigma=1.0))
    by_max, max_scores = compute_metrics(scores, Scorer(image_score="max", sigma=1.0), smooth=True)
    assert by_mean["image_auroc"] == by_mean["image_auroc_rec"] == 0.0
    assert by_max["image_auroc"] == by_max["image_auroc_max"] == by_mean["image_auroc_max"] == 1.0
    assert by_max["pixel_smoothed"] and not by_mean["pixel_smoothed"]
    smoothed = gaussian_filter(maps, sigma=(0, 1, 1), mode="reflect", truncate=4.0)
    assert by_max["pixel_auroc"] == by_mean["pixel_auroc_smoothed"] == pytest.approx(pixel_auroc(masks, smoothed))
    assert by_mean["pixel_auroc"] == by_mean["pixel_auroc_raw"] == pixel_auroc(masks, maps)
    # The returned image scores are those the AUROCs are of.
    assert by_max["image_auroc"] == image_auroc(scores.labels, max_scores.fused)
    np.testing.assert_array_equal(mean_scores.max, max_scores.max)


def test_fused_metrics_of_both_image_scores():
    rng = np.random.default_rng(2)
    maps, feat = rng.random((8, 8, 8)), rng.random(8)
    scores = score_set([0, 0, 0, 0, 1, 1, 1, 1], maps, feat=feat)
    scorer = Scorer(gamma=0.9, image_score="mean", sigma=1.0)
    metrics, image = compute_metrics(scores, scorer)
    assert metrics["image_auroc_feat"] == image_auroc(scores.labels, feat)
    by_max = replace(scorer, image_score="max")
    assert metrics["image_auroc_fused_max"] == image_auroc(scores.labels, by_max.score(maps, feat))
    assert compute_metrics(scores, by_max)[0]["image_auroc"] == metrics["image_auroc_fused_max"]
