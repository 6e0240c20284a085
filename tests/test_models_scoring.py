"""models/: losses, score fusion and metrics against hand-computed values; checkpoint files,
including damaged, edited and inconsistent ones."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import atomic
from models.checkpoint import CheckpointError, UnverifiedCheckpointWarning, load_checkpoint, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.inference import ScoreSet, compute_metrics, load_detector
from models.losses import (LossWeights, alignment_loss, discriminator_loss, entropy_loss,
                           generator_loss)
from models.scoring import (default_sigma, fuse_scores, image_auroc, image_scores, min_max, pixel_auroc,
                            smooth_maps)
from models.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def test_fusion_against_hand_computed_values():
    rec = np.array([2.0, 4.0, 3.0, 6.0])  # scaled: 0, 0.5, 0.25, 1
    feat = np.array([10.0, 30.0, 50.0, 20.0])  # scaled: 0, 0.5, 1, 0.25
    expected = [0.0, 0.9 * 0.5 + 0.1 * 0.5, 0.9 * 0.25 + 0.1 * 1.0, 0.9 * 1.0 + 0.1 * 0.25]
    np.testing.assert_allclose(fuse_scores(rec, feat, 0.9), expected)
    np.testing.assert_allclose(fuse_scores(rec, None, 0.9), [0, 0.5, 0.25, 1])  # no discriminator: R only
    np.testing.assert_allclose(fuse_scores(rec, feat, 0.0), [0, 0.5, 1, 0.25])
    # Fixed ranges (models.predict): values outside the range go outside [0, 1].
    np.testing.assert_allclose(fuse_scores(np.array([8.0]), np.array([0.0]), 0.5, (2, 6), (10, 50)),
                               [0.5 * 1.5 + 0.5 * -0.25])


def test_min_max_of_a_constant_set_is_zero():
    np.testing.assert_array_equal(min_max(np.array([3.0, 3.0])), [0.0, 0.0])


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


def test_losses_against_hand_computed_values():
    x, x_hat = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    f_real, f_fake = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert alignment_loss(f_real, f_fake).item() == pytest.approx((1 + 4 + 9) / 2)
    logit_fake = torch.zeros(2)  # D(x_hat) = 0.5: BCE = log 2
    total, parts = generator_loss(x, x_hat, LossWeights(), logit_fake=logit_fake,
                                  feature_real=f_real, feature_fake=f_fake)
    assert parts["rec"].item() == pytest.approx(0.25) and parts["adv"].item() == pytest.approx(math.log(2))
    assert total.item() == pytest.approx(50 * 0.25 + 0.5 * math.log(2) + 0.5 * 7)
    assert discriminator_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0, abs=1e-6)
    w = torch.tensor([[[0.5, 0.5, 0.0]]])
    assert entropy_loss([w, w]).item() == pytest.approx(2 * math.log(2))


def test_checkpoint_round_trip_and_errors(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"config": {"a": [1, 2]}, "epoch": 3, "generator": {"w": torch.arange(3.0)}}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["generator"]["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of models.train"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(text)


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"config": {}, "epoch": 1, "generator": {}}, path)
    with pytest.raises(Exception):
        save_checkpoint({"config": {}, "epoch": 2, "generator": {}, "bad": lambda: None}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_pixel_auroc_leaves_out_images_whose_mask_is_unknown():
    maps = np.zeros((3, 2, 2))
    maps[0, 0, 0] = maps[2, 1, 1] = 1.0  # image 2's hot pixel would be a false positive ...
    masks = np.zeros((3, 2, 2))
    masks[0, 0, 0] = 1
    scores = ScoreSet(labels=np.array([1, 0, 1]), rec=np.array([3.0, 1.0, 2.0]), feat=None, maps=maps,
                      masks=masks, mask_known=np.array([True, True, False]), indices=np.arange(3))
    metrics = compute_metrics(scores, 1.0)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] == 1.0  # ... but its mask is unknown, so it does not count
    assert compute_metrics(scores._replace(mask_known=np.ones(3, bool)), 1.0)["pixel_auroc"] < 1.0
    assert compute_metrics(scores._replace(mask_known=np.zeros(3, bool)), 1.0)["pixel_auroc"] is None


# ----------------------------------------------------------------------------- checkpoints that lie

SMALL = ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1), num_items=16)


@pytest.fixture
def trained_checkpoint(tmp_path):
    trainer = Trainer(TrainConfig(model=SMALL), torch.device("cpu"))
    trainer.train_step(torch.rand(2, 3, 32, 32) * 2 - 1)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(trainer.state_dict(), path)
    return path


def test_flipped_bytes_fail_the_checksum(trained_checkpoint):
    data = bytearray(trained_checkpoint.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    broken = trained_checkpoint.with_name("flipped.pt")
    broken.write_bytes(bytes(data))
    assert torch.load(broken, weights_only=True)  # PyTorch itself reads it without complaint
    with pytest.raises(CheckpointError, match=rf"{broken} fails its checksum"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_detector(str(broken), torch.device("cpu"))


def test_settings_that_disagree_with_the_weights(trained_checkpoint):
    state = torch.load(trained_checkpoint, weights_only=True)
    state["config"]["model"]["num_items"] = 17
    edited = trained_checkpoint.with_name("edited.pt")
    torch.save(state, edited)  # edited by hand: the checksum no longer matches
    with pytest.raises(CheckpointError, match=rf"{edited} fails its checksum"):
        load_checkpoint(edited)
    state.pop("checksum")
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, edited)  # written inconsistent
    with pytest.raises(CheckpointError, match=rf"{edited}: its stored settings do not fit its generator "
                                              r"state \(Error\(s\) in loading state_dict .*size mismatch"):
        load_detector(str(edited), torch.device("cpu"))
    config = TrainConfig.from_dict(state["config"])
    with pytest.raises(CheckpointError, match=rf"{edited}: its stored settings do not fit"):
        Trainer(config, torch.device("cpu")).load_state_dict(load_checkpoint(edited), str(edited))


@pytest.mark.parametrize("key, value", [("generator", {}), ("discriminator", None), ("opt_d", None)])
def test_missing_network_or_optimizer_state(trained_checkpoint, key, value):
    state = load_checkpoint(trained_checkpoint)
    state.pop("format")
    state[key] = value
    save_checkpoint(state, trained_checkpoint)
    with pytest.raises(CheckpointError, match=rf"{trained_checkpoint} lacks the {key} state"):
        Trainer(TrainConfig(model=SMALL), torch.device("cpu")).load_state_dict(
            load_checkpoint(trained_checkpoint), str(trained_checkpoint))
    if key != "opt_d":
        with pytest.raises(CheckpointError, match=rf"lacks the {key} state"):
            load_detector(str(trained_checkpoint), torch.device("cpu"))


def test_non_finite_weights_are_refused(trained_checkpoint):
    state = load_checkpoint(trained_checkpoint)
    state.pop("format")
    name = next(iter(state["generator"]))
    state["generator"][name] = torch.full_like(state["generator"][name], float("nan"))
    save_checkpoint(state, trained_checkpoint)
    with pytest.raises(CheckpointError, match=rf"non-finite \(NaN or infinite\) generator weights in {name}"):
        load_detector(str(trained_checkpoint), torch.device("cpu"))


def test_a_checkpoint_without_checksum_loads_with_a_warning(trained_checkpoint):
    state = torch.load(trained_checkpoint, weights_only=True)
    state.pop("checksum")
    torch.save(state, trained_checkpoint)
    with pytest.warns(UnverifiedCheckpointWarning, match="has no checksum"):
        model, config, _ = load_detector(str(trained_checkpoint), torch.device("cpu"))
    assert config.model == SMALL


def test_a_save_removes_the_temporary_files_of_killed_writers(tmp_path):
    path = tmp_path / "ck.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = atomic._host()
    stale = tmp_path / f".ck.pt.{dead_pid}-{host}.abc123.tmp"
    live = tmp_path / f".ck.pt.{os.getppid()}-{host}.xyz789.tmp"  # a live writer's: kept
    elsewhere = tmp_path / f".ck.pt.{dead_pid}-another_host.abc123.tmp"  # another machine's: kept
    other = tmp_path / f".other.pt.{dead_pid}-{host}.abc123.tmp"  # another file's: kept
    for f in (stale, live, elsewhere, other):
        f.write_bytes(b"x" * 1000)
    save_checkpoint({"config": {}, "epoch": 1, "generator": {}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ck.pt", live.name, elsewhere.name, other.name])


def test_gaussian_smoothing_against_a_direct_sum():
    maps = np.zeros((1, 21, 21))
    maps[0, 10, 10] = 1.0
    sigma = 1.5
    smoothed = smooth_maps(maps, sigma)[0]
    offsets = np.arange(-6, 7)  # the kernel reaches 4 sigma = 6 pixels: all of it fits the map
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    expected = np.zeros((21, 21))
    expected[4:17, 4:17] = np.outer(kernel, kernel)
    np.testing.assert_allclose(smoothed, expected, atol=1e-12)
    assert np.array_equal(smooth_maps(maps, 0.0), maps)
    assert default_sigma(256) == 4.0 and default_sigma(64) == 1.0


def test_the_max_score_finds_a_small_defect_that_the_mean_misses():
    """Textures with small defects: a normal image with background error everywhere has the
    larger mean; the defective one a small bright spot, which the smoothed maximum sees."""
    normal = np.full((16, 16), 0.2)
    defect = np.full((16, 16), 0.1)
    defect[7:9, 7:9] = 1.0
    maps = np.stack([normal, defect])
    assert image_scores(maps, "mean").argmax() == 0
    assert image_scores(maps, "max", sigma=1.0).argmax() == 1
    with pytest.raises(ValueError, match="unknown image score"):
        image_scores(maps, "median")


def test_metrics_with_the_max_score_and_smoothed_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 16, 16)) * 0.1
    masks = np.zeros((4, 16, 16))
    maps[2:, 5:7, 5:7] += 1.0
    masks[2:, 5:7, 5:7] = 1
    labels = np.array([0, 0, 1, 1])
    maps[:2] += 0.2  # normal images: more background error, a larger mean
    scores = ScoreSet(labels, maps.reshape(4, -1).mean(1), None, maps, masks, np.ones(4, bool), np.arange(4))
    by_mean = compute_metrics(scores, 1.0)
    by_max = compute_metrics(scores, 1.0, image_score="max", sigma=1.0, smooth=True)
    assert by_mean["image_auroc"] == by_mean["image_auroc_rec"] == 0.0
    assert by_max["image_auroc"] == by_max["image_auroc_max"] == by_mean["image_auroc_max"] == 1.0
    assert by_max["pixel_smoothed"] and not by_mean["pixel_smoothed"]
    assert by_max["pixel_auroc"] == pytest.approx(
        pixel_auroc(masks, smooth_maps(maps, 1.0)))
