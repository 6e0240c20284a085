"""models/networks/maps.py: the SSIM anomaly map against a direct float64 computation, its loss,
and a run trained and scored by it, through to the exported graph."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.networks.losses import reconstruction_loss
from models.networks.maps import anomaly_map, ssim

pytestmark = pytest.mark.usefixtures("single_thread")


def ssim_at(x: np.ndarray, y: np.ndarray, row: int, col: int) -> float:
    """SSIM of one pixel of two (C, H, W) images in [-1, 1], as intensities in [0, 1], by explicit
    weighted sums over its reflected 11 x 11 Gaussian window (sigma 1.5), averaged over channels
    (Wang et al. 2004: K1 = 0.01, K2 = 0.03, data range 1)."""
    x, y = (x + 1) / 2, (y + 1) / 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    half = 5
    offsets = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (offsets / 1.5) ** 2)
    weights = np.outer(g, g) / np.outer(g, g).sum()

    def reflect(i: int, n: int) -> int:  # torch's "reflect": d c b | a b c d | c b a
        i = abs(i)
        return 2 * (n - 1) - i if i >= n else i

    rows = [reflect(row + o, x.shape[1]) for o in offsets]
    cols = [reflect(col + o, x.shape[2]) for o in offsets]
    values = []
    for a, b in zip(x, y):
        wa, wb = a[np.ix_(rows, cols)], b[np.ix_(rows, cols)]
        mu_a, mu_b = (weights * wa).sum(), (weights * wb).sum()
        var_a = (weights * wa * wa).sum() - mu_a ** 2
        var_b = (weights * wb * wb).sum() - mu_b ** 2
        cov = (weights * wa * wb).sum() - mu_a * mu_b
        values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 20, generator=gen, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    got = ssim(x, y)
    for b, row, col in [(0, 0, 0), (0, 7, 9), (1, 15, 19), (1, 3, 18)]:  # corners and borders too
        assert got[b, row, col].item() == pytest.approx(ssim_at(x[b].numpy(), y[b].numpy(), row, col), abs=1e-12)
    assert torch.allclose(ssim(x, x), torch.ones_like(got)) and torch.allclose(ssim(x, y), ssim(y, x))
    assert anomaly_map(x, x, "ssim").abs().max() < 1e-12
    assert torch.allclose(anomaly_map(x, y, "ssim"), (1 - got) / 2)
    assert torch.allclose(anomaly_map(x, y, "l2"), (x - y).pow(2).mean(dim=1))
    assert reconstruction_loss(x, y, "ssim").item() == pytest.approx((1 - got).mean().item())
    with pytest.raises(ValueError, match="unknown anomaly map"):
        anomaly_map(x, y, "l1")


def test_ssim_barely_sees_a_small_change_of_brightness_of_mid_grey():
    # Windows whose means are near 0 in [-1, 1]: SSIM's luminance term on [-1, 1] itself would
    # score a shift of 1% of the range as a third of the way to the largest dissimilarity.
    gen = torch.Generator().manual_seed(0)
    x = 0.05 * torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64) - 0.01
    assert anomaly_map(x, x + 0.02, "ssim").max() < 1e-3
    assert anomaly_map(x, x + 0.5, "ssim").mean() > 50 * anomaly_map(x, x + 0.02, "ssim").mean()


def test_ssim_under_bfloat16_autocast_is_computed_in_float32():
    # The fast inference path scores under bfloat16 autocast, which would run SSIM's window means
    # (convolutions) in bfloat16: their variances cancel to noise there.
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1).bfloat16()  # a reconstruction under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = anomaly_map(x, y, "ssim")
    assert got.dtype == torch.float32
    assert torch.allclose(got, anomaly_map(x, y.float(), "ssim"), atol=1e-6)


def test_a_run_trained_and_scored_by_ssim(hazelnut, tmp_path):
    from models import evaluate, export, train
    from models.data.preprocess import to_model_input
    from models.inference import Scorer
    from models.inference.run_scoring import UntrainedWarning
    from models.training import load_detector

    out = tmp_path / "run"
    with pytest.warns(UntrainedWarning):  # one epoch: it has not learnt yet
        train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4", "--batch", "8",
                    "--device", "cpu", "--model", "daad+", "--division", "2", "2", "1", "--num-items", "20",
                    "--epochs", "1", "--rec-loss", "ssim", "--anomaly-map", "ssim", "--out", str(out)])
    result = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"),
                            "--num-heatmaps", "0", "--device", "cpu"])
    assert result["anomaly_map"] == "ssim" and 0 <= result["image_auroc"] <= 1
    assert evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval-l2"),
                          "--num-heatmaps", "0", "--device", "cpu", "--anomaly-map", "l2"])["anomaly_map"] == "l2"
    path = export.main(["--checkpoint", str(out / "checkpoint.pt"), "--format", "pt2", "--out", str(tmp_path / "g")])
    assert json.loads((tmp_path / "g" / "detector.json").read_text())["anomaly_map"] == "ssim"
    model, config, state = load_detector(str(out / "checkpoint.pt"), torch.device("cpu"))
    pixels = torch.randint(0, 256, (3, 40, 48, 3), dtype=torch.uint8)  # as decoded: the graph resizes them
    images = to_model_input(pixels.permute(0, 3, 1, 2), 32)
    with torch.no_grad():
        maps, scores = torch.export.load(path).module()(pixels)
    s = model.score(images, config.ali_loss, "ssim")
    expected = Scorer.calibrated(config, state, "run").score(s.error_map.numpy(), s.feat.numpy())
    np.testing.assert_allclose(maps.numpy(), s.error_map.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-4)
    assert math.isfinite(float(scores.sum()))
