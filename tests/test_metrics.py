"""models/metrics.py: AUPRO on hand-made masks whose value is worked out by hand, best F1, per-defect
AUROC, and the metrics in evaluate's metrics.json."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from models.inference.metrics import aupro, auroc_per_defect, best_f1, pro_curve


def two_images(scores_a: dict, scores_b: dict, normal: float, shape=(4, 4)):
    """Masks and maps of two images: ``{(y, x): score}`` of the defect pixels of each, every
    other pixel normal with score ``normal``."""
    masks, maps = np.zeros((2, *shape)), np.full((2, *shape), normal)
    for i, pixels in enumerate((scores_a, scores_b)):
        for (y, x), score in pixels.items():
            masks[i, y, x], maps[i, y, x] = 1, score
    return masks, maps


def test_aupro_regions_count_once_whatever_their_size():
    # Region A (4 pixels, score 0.9) is found before any of the 28 normal pixels (0.5); region B
    # (1 pixel, 0.0) only after all of them. The PRO is (1 + 0) / 2 = 0.5 from FPR 0 to 1 (pixel
    # recall would be 4/5): the area up to 0.3 is 0.5 * 0.3, normalised 0.5.
    masks, maps = two_images({(0, 0): .9, (0, 1): .9, (1, 0): .9, (1, 1): .9}, {(3, 3): 0.0}, normal=.5)
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_steps():
    # One 2-pixel region (0.9 and 0.4) in an image of 10 normal pixels: one normal at 0.8, nine at
    # 0.1. Curve (0,0) -> (0,.5) at 0.9 -> (.1,.5) at 0.8 -> (.1,1) at 0.4 -> (1,1) at 0.1.
    # Area to FPR 0.3: 0.1 * 0.5 + 0.2 * 1 = 0.25; normalised 0.25 / 0.3.
    masks = np.zeros((1, 1, 12))
    masks[0, 0, :2] = 1
    maps = np.array([[[.9, .4, .8] + [.1] * 9]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 0, .1, .1, 1])
    np.testing.assert_allclose(pro, [0, .5, .5, 1, 1])
    assert aupro(masks, maps) == pytest.approx(0.25 / 0.3)


def test_aupro_ties_give_a_sloped_segment_cut_at_the_limit():
    # All 16 pixels score the same: one threshold takes the curve from (0, 0) to (1, 1) in one
    # straight segment; cut at FPR 0.3 its area is 0.3 * 0.3 / 2, normalised 0.15.
    masks = np.zeros((1, 4, 4))
    masks[0, 0, :2] = 1
    assert aupro(masks, np.full((1, 4, 4), 0.5)) == pytest.approx(0.15)
    # A perfect map, and one that ranks every defect pixel below every normal pixel.
    assert aupro(masks, masks) == pytest.approx(1.0)
    assert aupro(masks, 1 - masks) == pytest.approx(0.0)


def test_aupro_regions_are_8_connected():
    # (0,0) and (1,1) touch at a corner: one region, half found at 0.9; (3,3) is a region of its
    # own, found. PRO (0.5 + 1) / 2 = 0.75 from FPR 0 to 1 (4-connected it would be 2/3).
    masks, maps = two_images({(0, 0): .9, (1, 1): 0.0, (3, 3): .9}, {}, normal=.5)
    assert aupro(masks, maps) == pytest.approx(0.75)


def test_aupro_without_regions_or_normal_pixels():
    assert aupro(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4)) is None
    assert aupro(np.ones((2, 4, 4)), np.random.rand(2, 4, 4)) is None


def brute_force_aupro(masks, maps, limit=0.3):
    """The definition, threshold by threshold (slow): FPR and per-region overlap at each distinct
    score, then the area of the piecewise-linear curve up to ``limit``."""
    regions = [(i, lab == k) for i, m in enumerate(masks > 0.5)
               for lab, n in [ndimage.label(m, structure=np.ones((3, 3)))] for k in range(1, n + 1)]
    normal = masks <= 0.5
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        points.append(((maps[normal] >= t).mean(),
                       np.mean([(maps[i][region] >= t).mean() for i, region in regions])))
    fpr, pro = map(np.array, zip(*points))
    # At each distinct FPR the curve may step up (a vertical segment); between two of them it runs
    # straight from the top of one step to the bottom of the next.
    xs, first = np.unique(fpr, return_index=True)
    bottom, top = pro[first], np.maximum.reduceat(pro, first)
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], top[:-1], bottom[1:]):
        if x0 >= limit:
            break
        x_end = min(x1, limit)
        area += (x_end - x0) * (y0 + y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)) / 2
    return area / limit


def test_aupro_matches_the_definition_on_random_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12))
    masks[0, 2:5, 3:9] = 1
    masks[1, 7:11, 1:3] = 1
    masks[1, 0, 11] = 1
    maps = rng.random(masks.shape).round(2) + 0.3 * masks  # rounding makes ties
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-12)


def test_best_f1():
    # Scores of 2 normal and 3 anomalous images: threshold 0.6 flags 0.6, 0.7 (normal), 0.9 ->
    # precision 2/3, recall 2/3; threshold 0.3 flags all -> precision 3/5, recall 1, F1 0.75;
    # threshold 0.9: precision 1, recall 1/3, F1 0.5. Best: 0.75 at 0.3.
    f1, threshold = best_f1(np.array([0, 0, 1, 1, 1]), np.array([0.5, 0.7, 0.3, 0.6, 0.9]))
    assert (f1, threshold) == (pytest.approx(0.75), 0.3)
    assert best_f1(np.array([0, 1]), np.array([0.1, 0.2])) == (1.0, 0.2)


def test_auroc_per_defect():
    names = ["test/good/0.png", "test/good/1.png", "test/crack/0.png", "test/cut/0.png", "test/cut/1.png"]
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.2, 0.5, 0.9, 0.1, 0.6])
    # crack (0.9) beats both normals: 1. cut: 0.1 beats none, 0.6 beats both: 2 of 4 pairs.
    assert auroc_per_defect(labels, scores, names) == {"crack": 1.0, "cut": 0.5}
    assert auroc_per_defect(labels, scores, ["mnist-test-%d" % i for i in range(5)]) == {}


@pytest.mark.usefixtures("single_thread")
def test_evaluate_writes_the_metrics(hazelnut, tmp_path, capsys):
    from models import evaluate, train

    out = tmp_path / "run"
    train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
                "--division", "2", "2", "1", "--num-items", "20", "--batch", "8", "--device", "cpu",
                "--model", "daad", "--epochs", "1", "--out", str(out)])
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"),
                   "--num-heatmaps", "0", "--device", "cpu"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["aupro"] <= 1 and 0 < metrics["image_f1"] <= 1
    # The subset's only defect type is "colour": its AUROC is the image AUROC.
    assert metrics["image_auroc_per_defect"] == {"colour": pytest.approx(metrics["image_auroc"])}
    assert {k: summary[k] for k in ("aupro", "image_f1")} == {k: metrics[k] for k in ("aupro", "image_f1")}
