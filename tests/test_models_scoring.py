"""models/: losses, score fusion and metrics against hand-computed values; checkpoint files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.losses import (LossWeights, alignment_loss, discriminator_loss, entropy_loss,
                           generator_loss)
from models.scoring import fuse_scores, image_auroc, min_max, pixel_auroc
from models_support import single_thread  # noqa: F401  (autouse fixture)


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
    assert parts["rec"] == pytest.approx(0.25) and parts["adv"] == pytest.approx(math.log(2))
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
