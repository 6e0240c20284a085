"""models/networks/losses.py: the losses against hand-computed values, the readings of the DAAD+ losses, the score L(x) that follows them, the
discriminator's re-initialisation and the training diagnostics (accuracy, gradient shares)."""
from __future__ import annotations

import math

import pytest
import torch

from models import train
from models.networks import AnomalyDetector, ModelConfig
from models.networks.losses import (LossWeights, alignment_loss, discriminator_accuracy, discriminator_loss,
                                    entropy_loss, feature_distance, generator_loss, reconstruction_loss)
from models.training import DEFAULT_READING, LOSS_READINGS, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


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


X, X_HAT = torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]).reshape(2, 1, 2, 2)
F_REAL, F_FAKE = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])


def test_reconstruction_readings_against_hand_computed_values():
    # image 1: four errors of 0.5; image 2: one error of 1
    assert reconstruction_loss(X, X_HAT, "mse").item() == pytest.approx((4 * 0.25 + 1) / 8)
    assert reconstruction_loss(X, X_HAT, "l1").item() == pytest.approx((4 * 0.5 + 1) / 8)
    assert reconstruction_loss(X, X_HAT, "norm").item() == pytest.approx((1.0 + 1.0) / 2)  # sqrt(4 * .25), sqrt(1)


def test_alignment_readings_against_hand_computed_values():
    # image 1: squared distance 1 + 4 = 5; image 2: 9 + 16 = 25
    assert feature_distance(F_REAL, F_FAKE, "sum_sq").tolist() == pytest.approx([5, 25])
    assert feature_distance(F_REAL, F_FAKE, "mean_sq").tolist() == pytest.approx([2.5, 12.5])
    assert feature_distance(F_REAL, F_FAKE, "norm").tolist() == pytest.approx([math.sqrt(5), 5])
    assert alignment_loss(F_REAL, F_FAKE, "norm").item() == pytest.approx((math.sqrt(5) + 5) / 2)


def test_norms_have_a_finite_gradient_at_zero():
    x_hat = torch.zeros(2, 1, 2, 2, requires_grad=True)
    reconstruction_loss(torch.zeros(2, 1, 2, 2), x_hat, "norm").backward()
    assert torch.isfinite(x_hat.grad).all()


def test_weights_apply_to_each_reading():
    total, parts = generator_loss(X, X_HAT, LossWeights(50, 0.5, 1.0), logit_fake=torch.zeros(2),
                                  feature_real=F_REAL, feature_fake=F_FAKE, rec_reduction="l1",
                                  ali_reduction="mean_sq")
    assert total.item() == pytest.approx(50 * 3 / 8 + 0.5 * math.log(2) + 1.0 * 7.5)
    assert sorted(parts) == ["adv", "ali", "g", "rec"]
    with pytest.raises(ValueError, match="unknown alignment loss 'sum'"):
        feature_distance(F_REAL, F_FAKE, "sum")


def test_discriminator_accuracy():
    assert discriminator_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -2.0])).item() == 0.75


@pytest.mark.parametrize("reading", sorted(LOSS_READINGS))
def test_score_L_is_the_per_image_alignment_loss(reading):
    torch.manual_seed(0)
    spec = LOSS_READINGS[reading]
    net = AnomalyDetector(ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1), num_items=20)).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    scores = net.score(x, spec["ali_loss"])
    with torch.no_grad():
        x_hat = net.generator(x).reconstruction
        expected = feature_distance(net.discriminator(x)[1], net.discriminator(x_hat)[1], spec["ali_loss"])
    torch.testing.assert_close(scores.feat, expected)


def test_defaults_and_presets():
    plus = TrainConfig(model=ModelConfig(model="daad+", size=64, division=(2, 2, 1)))
    plain = TrainConfig(model=ModelConfig(model="daad", size=64, division=(2, 2, 1)))
    for key, value in LOSS_READINGS[DEFAULT_READING].items():
        assert getattr(plus, key) == value
    for key, value in LOSS_READINGS["old"].items():  # only L_rec exists: the baselines keep theirs
        assert getattr(plain, key) == value
    # L_rec by SSIM takes the weights set for its scale, unless weights are given
    by_ssim = TrainConfig(model=plus.model, rec_loss="ssim")
    assert (by_ssim.ali_loss, by_ssim.loss_weights) == ("norm", LOSS_READINGS["ssim"]["loss_weights"])
    assert TrainConfig(model=plus.model, rec_loss="ssim", loss_weights=(50, 0.5, 0.5)).loss_weights == (50, 0.5, 0.5)
    assert TrainConfig(model=plain.model, rec_loss="ssim").loss_weights == LOSS_READINGS["old"]["loss_weights"]
    # A checkpoint from before the readings were options was trained with the old one.
    stored = plus.to_dict()
    for key in ("rec_loss", "ali_loss", "d_reset"):
        del stored[key]
    stored["loss_weights"] = [50.0, 0.5, 0.5]
    legacy = TrainConfig.from_dict(stored)
    assert (legacy.rec_loss, legacy.ali_loss, legacy.d_reset) == ("mse", "sum_sq", 0.0)
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        TrainConfig(rec_loss="l3")


def test_losses_flag_sets_a_reading_that_single_flags_override(tmp_path):
    args = ["--root", str(tmp_path), "--model", "daad+", "--size", "32", "--division", "2", "2", "1"]
    config, _ = train.make_config(train.build_parser().parse_args(args + ["--losses", "ganomaly", "--d-reset", "0.5"]))
    assert (config.rec_loss, config.ali_loss, config.loss_weights, config.d_reset) == ("l1", "mean_sq", (50, 0.5, 1), 0.5)


def small_trainer(**settings) -> Trainer:
    config = TrainConfig(model=ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1), num_items=20),
                         **settings)
    return Trainer(config, torch.device("cpu"))


def test_a_collapsed_discriminator_is_reinitialised():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    never, always = small_trainer(d_reset=0.0), small_trainer(d_reset=1e9)  # every loss is below 1e9
    assert never.train_step(x)["d_reset"] == 0.0 and always.train_step(x)["d_reset"] == 1.0
    stepped = never.model.discriminator.state_dict()
    reset = always.model.discriminator.state_dict()
    # Same seed and step: only the re-initialisation tells the two apart, and it changes every layer.
    assert not torch.equal(stepped["features.0.weight"], reset["features.0.weight"])
    bn = [k for k in reset if k.endswith("running_mean")]
    assert bn and all(torch.equal(reset[k], torch.zeros_like(reset[k])) for k in bn)


def test_gradient_shares_sum_to_one_and_leave_the_run_untouched():
    trainer = small_trainer()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    trainer.train_step(x)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    shares = trainer.gradient_shares(x)
    assert sorted(shares) == ["adv", "ali", "rec"] and sum(shares.values()) == pytest.approx(1)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_resume_is_exact_with_discriminator_resets(hazelnut, tmp_path):
    args = ["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4", "--division", "2", "2",
            "1", "--num-items", "20", "--device", "cpu", "--model", "daad+", "--losses", "ganomaly",
            "--d-reset", "0.65", "--seed", "1"]
    straight = train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")])
    train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")])
    resumed = train.main(["--resume", "--epochs", "2", "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert sum(h["d_reset"] for h in straight.history) > 0  # the threshold made D restart
    assert "grad_share" in straight.history[0] and "grad_share" in straight.history[-1]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_discriminator_resets_are_refused_under_ddp():
    config = TrainConfig(model=ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1), num_items=20),
                         d_reset=1e-5)
    with pytest.raises(ValueError, match="--d-reset is not supported with DistributedDataParallel"):
        Trainer(config, torch.device("cpu"), ddp=True)
