"""The one calibration (models/inference/calibration.py): 0.5 is the boundary, thresholds from the
normal quantile or the best F1, measured after training on the held-out images, refreshed by
``python -m models.calibrate`` atomically and undoably, and old checkpoints refused clearly."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models import Detector, calibrate as calibrate_command, evaluate
from models.inference import ScoreSet, Scorer, collect_scores
from models.inference.calibration import NORMAL_QUANTILE, PIXEL_QUANTILE, calibrate, decision_counts
from models.inference.metrics import best_f1
from models.inference.scorer import DECISION_KEYS, PIXEL_KEYS
from models.training import load_checkpoint, load_detector

pytestmark = pytest.mark.usefixtures("single_thread")


def score_set(labels, maps, feat=None, masks=None) -> ScoreSet:
    n = len(labels)
    masks = np.zeros_like(maps) if masks is None else masks
    return ScoreSet(np.asarray(labels), feat, maps, masks, np.ones(n, bool), np.arange(n))


@pytest.mark.parametrize("image_score", ["mean", "max"])
def test_a_normal_quantile_threshold_is_the_boundary(image_score):
    rng = np.random.default_rng(0)
    maps, feat = rng.random((200, 12, 12)) ** 2, rng.random(200) * 5
    ranges = Scorer(gamma=0.7, sigma=1.0)
    calibration = calibrate(ranges, score_set(np.zeros(200), maps, feat))
    scorer = replace(ranges, image_score=image_score, calibration=calibration)
    fused = scorer.image_scores(maps, feat).fused
    threshold, span = scorer.decision()
    assert threshold == pytest.approx(np.quantile(fused, NORMAL_QUANTILE), abs=1e-12)
    assert span == pytest.approx(fused.max() - fused.min())
    pred = scorer.score(maps, feat)
    np.testing.assert_allclose(pred, np.clip((fused - threshold) / span + 0.5, 0, 1))
    assert (pred >= 0.5).sum() == 2  # the images above the 99th percentile of 200
    at = np.abs(fused - threshold).argmin()  # an image's own A(x) as the threshold scores exactly 0.5
    assert replace(scorer, calibration={**calibration, DECISION_KEYS[image_score][0]: fused[at]}).score(
        maps[at:at + 1], feat[at:at + 1])[0] == 0.5
    torch.testing.assert_close(scorer.score_torch(torch.from_numpy(maps), torch.from_numpy(feat)),
                               torch.from_numpy(pred), rtol=0, atol=1e-9)
    pixel_threshold = calibration[PIXEL_KEYS[0]]
    assert pixel_threshold == pytest.approx(np.quantile(maps, PIXEL_QUANTILE))
    assert scorer.normalise_map(np.array([pixel_threshold]))[0] == 0.5


def test_abnormal_images_give_the_threshold_of_the_best_f1():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30), np.ones(10)]
    maps = rng.random((40, 8, 8)) + labels[:, None, None] * rng.random((40, 1, 1))  # overlapping classes
    masks = np.zeros_like(maps)
    masks[30:, :4, :4] = 1
    maps[30:, :4, :4] += 0.5
    calibration = calibrate(Scorer(), score_set(labels, maps, masks=masks))
    scorer = Scorer(image_score="max", sigma=1.0, calibration=calibration)
    fused = scorer.image_scores(maps, None).fused
    best, threshold = best_f1(labels, fused)
    assert calibration["image_threshold_max"] == threshold
    assert decision_counts(labels, scorer.score(maps, None) >= 0.5)["f1"] == pytest.approx(best)
    pixel_best, pixel_threshold = best_f1(masks.ravel(), maps.ravel())
    assert calibration["pixel_threshold"] == pixel_threshold
    assert decision_counts(masks, scorer.normalise_map(maps) >= 0.5)["f1"] == pytest.approx(pixel_best)


def test_decision_counts_and_settings_checks():
    assert decision_counts([1, 1, 0, 0, 0], [1, 0, 1, 0, 0]) == {"f1": 0.5, "precision": 0.5, "recall": 0.5,
                                                                 "tp": 1, "fp": 1, "tn": 2, "fn": 1}
    calibration = calibrate(Scorer(gamma=0.9), score_set(np.zeros(4), np.random.default_rng(2).random((4, 8, 8))))
    with pytest.raises(ValueError, match="measured with gamma 0.9"):
        Scorer(gamma=0.5, calibration=calibration)
    with pytest.raises(ValueError, match="needs normal images"):
        calibrate(Scorer(), score_set(np.ones(2), np.zeros((2, 4, 4))))


@pytest.fixture(scope="module")
def run(tiny_run):
    """The checkpoint and settings of a run with a validation split, and the hazelnut subset."""
    from models.data import data_root

    checkpoint, trainer = tiny_run
    return checkpoint, trainer.config, data_root() / "mvtec_hazelnut_subset"


def test_training_stores_the_calibration_of_its_validation_images(run):
    checkpoint, config, _ = run
    stored = load_checkpoint(checkpoint)["calibration"]
    assert set(stored) >= {*DECISION_KEYS["mean"], *DECISION_KEYS["max"], *PIXEL_KEYS, "gamma", "sigma"}
    model, _, _ = load_detector(checkpoint, torch.device("cpu"))
    scorer = Scorer.for_run(config)
    expected = calibrate(scorer, collect_scores(model, config.dataset_split("val"), torch.device("cpu"), scorer))
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert stored[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_the_calibrate_command_replaces_atomically_and_undoes(run, tmp_path, monkeypatch):
    checkpoint, _, hazelnut = run
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes(checkpoint.read_bytes())
    before = load_checkpoint(copy)["calibration"]
    new = calibrate_command.main(["--checkpoint", str(copy), "--normal-dir", str(hazelnut / "test" / "good"),
                                  "--abnormal-dir", str(hazelnut / "test" / "colour"), "--mask-dir",
                                  str(hazelnut / "ground_truth" / "colour"), "--device", "cpu", "--no-fast"])
    state = load_checkpoint(copy)
    assert state["calibration"] == new != before and state["previous_calibrations"] == [before]
    # Measured on these images with their labels: the stored threshold is their best F1.
    results = Detector.load(copy, "cpu", fast=False).predict([str(hazelnut / "test" / "good"),
                                                               str(hazelnut / "test" / "colour")])
    labels = np.array(["colour" in r.name for r in results])
    scores = np.array([r.pred_score for r in results])
    assert decision_counts(labels, scores >= 0.5)["f1"] == pytest.approx(best_f1(labels, scores)[0])

    def broken_save(*args, **kwargs):  # a crash in the middle of the write
        args[1].write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    written = copy.read_bytes()
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit):
        calibrate_command.main(["--checkpoint", str(copy), "--normal-dir", str(hazelnut / "test" / "good"),
                                "--device", "cpu"])
    monkeypatch.undo()
    assert copy.read_bytes() == written and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert calibrate_command.main(["--checkpoint", str(copy), "--undo"]) == before
    assert load_checkpoint(copy)["calibration"] == before and load_checkpoint(copy)["previous_calibrations"] == []


def test_a_checkpoint_without_thresholds_is_refused_clearly_and_can_be_calibrated(run, tmp_path):
    from models.training import save_checkpoint

    checkpoint, _, hazelnut = run
    state = load_checkpoint(checkpoint)
    old_keys = ("rec_min", "rec_max", "max_min", "max_max", "feat_min", "feat_max")
    state["calibration"] = {k: state["calibration"][k] for k in old_keys}  # as written before thresholds
    old = tmp_path / "old.pt"
    save_checkpoint(state, old)
    with pytest.raises(ValueError, match="without decision thresholds.*models.calibrate"):
        Detector.load(old, "cpu")
    with pytest.warns(UserWarning, match="no decision metrics"):
        result = evaluate.main(["--checkpoint", str(old), "--out", str(tmp_path / "eval"), "--device", "cpu",
                                "--num-heatmaps", "0"])
    assert result["calibrated"] is False and "image_decision" not in result and 0 <= result["image_auroc"] <= 1
    calibrate_command.main(["--checkpoint", str(old), "--normal-dir", str(hazelnut / "train" / "good"),
                            "--device", "cpu"])
    assert 0 <= Detector.load(old, "cpu").predict(str(hazelnut / "test" / "good" / "04.jpg"))[0].pred_score <= 1


def test_the_calibrate_command_refuses_bad_requests(run, capsys):
    checkpoint = str(run[0])
    for argv, message in ((["--checkpoint", checkpoint], "give --normal-dir"),
                          (["--checkpoint", checkpoint, "--normal-dir", "x", "--undo"], "give --normal-dir"),
                          (["--checkpoint", checkpoint, "--undo"], "keeps no previous calibration"),
                          (["--checkpoint", checkpoint, "--normal-dir", "/nonexistent"], "not found")):
        with pytest.raises(SystemExit):
            calibrate_command.main(argv)
        assert message in capsys.readouterr().err, argv


def test_a_resumed_run_does_not_keep_the_calibration_of_its_older_weights(tiny_run):
    """The calibration belongs to the weights it was measured on: a run resumed past its end
    holds none until its new last epoch measures one (then every path refuses the checkpoint
    in between, rather than deciding with old thresholds)."""
    from models.training import load_checkpoint
    from models.training.trainer import Trainer

    checkpoint, trainer = tiny_run
    state = load_checkpoint(checkpoint)
    assert state["calibration"] is not None
    resumed = Trainer(trainer.config, torch.device("cpu"))
    resumed.load_state_dict(state, str(checkpoint))
    resumed.end_epoch({"epoch": state["epoch"] + 1})  # an epoch that is not the last
    assert resumed.state_dict()["calibration"] is None
