"""models/: how long a run trains and how it knows it has learnt: --steps, a held-out validation
set, --until-plateau, the test metrics on a fixed subset, learning curves, the untrained warning."""
from __future__ import annotations

import json
import warnings

import pytest

from models import train
from models.inference.run_scoring import UntrainedWarning, fixed_test_subset
from models.networks import ModelConfig
from models.training import TrainConfig
from models.training.loop import plateaued, total_epochs

pytestmark = pytest.mark.usefixtures("single_thread")


def test_plateau_rule():
    log = lambda *errors: [{"val_error": e} for e in errors]  # noqa: E731
    assert not plateaued(log(1.0, 0.9), window=2, tolerance=0.01)  # too short to tell
    assert not plateaued(log(1.0, 0.9, 0.8), window=2, tolerance=0.01)  # still improving
    assert plateaued(log(1.0, 0.9, 0.95, 0.9), window=2, tolerance=0.01)  # no better than 0.9
    assert plateaued(log(1.0, 0.9, 0.895, 0.92), window=2, tolerance=0.01)  # better by under 1%
    assert not plateaued(log(1.0, 0.9, 0.88, 0.95), window=2, tolerance=0.01)
    assert not plateaued([{"epoch": 1}, {"epoch": 2}, {"epoch": 3}], window=1, tolerance=0.0)  # no validation


def test_steps_decide_the_epochs():
    config = TrainConfig(steps=10, model=ModelConfig(model="ae", size=32, width=4))
    assert total_epochs(config, 3) == 4 and total_epochs(config, 10) == 1 and total_epochs(config, 11) == 1
    assert total_epochs(TrainConfig(epochs=7), 3) == 7
    with pytest.raises(ValueError, match="until_plateau watches the validation error"):
        TrainConfig(until_plateau=True)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)


def test_validation_images_are_held_out_the_same_for_every_seed(hazelnut):
    configs = [TrainConfig(root=str(hazelnut), val_ratio=0.25, seed=seed, model=ModelConfig(model="ae", size=32, width=4))
               for seed in (0, 1)]
    train_set, val_set = (configs[0].dataset_split(split) for split in ("train", "val"))
    assert len(train_set) + len(val_set) == 28 and len(val_set) == 7
    assert not set(train_set.names) & set(val_set.names)
    assert configs[1].dataset_split("val").names == val_set.names
    assert len(TrainConfig(root=str(hazelnut), model=configs[0].model).dataset_split("train")) == 28


def test_a_fixed_test_subset_keeps_both_classes():
    labels = [0] * 6 + [1] * 17
    picked = fixed_test_subset(labels, 8)
    assert len(picked) == 8 and picked == fixed_test_subset(labels, 8)
    assert 0 < sum(labels[i] for i in picked) < 8
    assert sum(labels[i] for i in fixed_test_subset(labels, 2)) == 1


def test_a_run_by_steps_with_validation_curves_and_the_untrained_warning(hazelnut, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4", "--batch", "8",
             "--device", "cpu", "--model", "ae", "--val-ratio", "0.25", "--eval-every", "1", "--eval-subset", "8",
             "--out", str(out)]
    with pytest.warns(UntrainedWarning, match=r"looks untrained after step 6: its reconstruction error is "
                                              r"[0-9.]+x the images' own variance"):
        trainer = train.main(flags + ["--steps", "4"])  # 21 training images: 3 steps an epoch
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in log] == [(1, 3), (2, 6)] and log[-1]["stopped"] == "steps"
    assert all("val_error" in r and "image_auroc" in r for r in log)
    assert (out / "learning_curves.png").stat().st_size > 0 and trainer.calibration is not None
    resumed = train.main(["--resume", "--steps", "6", "--out", str(out)])  # its rule is met already
    assert resumed.epoch == 2 and "nothing to train" in capsys.readouterr().out


def test_a_run_stops_at_the_plateau_and_logs_its_gradient_shares_there(hazelnut, tmp_path):
    out = tmp_path / "run"
    flags = ["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4", "--division", "2", "2",
             "1", "--num-items", "20", "--batch", "8", "--device", "cpu", "--model", "daad+", "--val-ratio", "0.25",
             "--epochs", "5", "--until-plateau", "--plateau-window", "1", "--plateau-tolerance", "0.99",
             "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWarning)  # a few epochs: it has not learnt yet
        train.main(flags)  # an error 99% lower than the epoch before, or the plateau: epoch 2 stops it
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1, 2] and log[-1]["stopped"] == "plateau"
        for record in log:  # which term drove the generator at the first epoch and at the last
            assert sorted(record["grad_share"]) == ["adv", "ali", "rec"]
            assert sum(record["grad_share"].values()) == pytest.approx(1.0)
        # no plateau before step 9 (21 training images: 3 steps an epoch), on resuming too
        train.main(["--resume", "--plateau-min-steps", "9", "--out", str(out)])
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert [(r["epoch"], r["step"], r.get("stopped")) for r in log] == [(1, 3, None), (2, 6, "plateau"),
                                                                            (3, 9, "plateau")]
        fresh = tmp_path / "fresh"
        train.main(flags[:-1] + [str(fresh), "--plateau-min-steps", "9"])
        assert [r.get("stopped") for r in map(json.loads, (fresh / "train_log.jsonl").read_text().splitlines())] \
            == [None, None, "plateau"]


def test_a_flat_reconstruction_is_named_untrained(hazelnut, tmp_path):
    import torch

    from models.inference import RunScoring
    from models.networks import AnomalyDetector, fit_mean_image

    config = TrainConfig(root=str(hazelnut), model=ModelConfig(model="ae", size=32, width=4))
    train_set = config.dataset_split("train")
    flat = AnomalyDetector(ModelConfig(model="mean-image", size=32))  # one grey image, whatever the input
    with pytest.warns(UntrainedWarning, match=r"its reconstructions are flat \(their variance is 0% of the images'"):
        RunScoring(config, train_set, torch.device("cpu")).finish(flat, [{"epoch": 1, "step": 3}], str(tmp_path))
    mean = fit_mean_image(train_set)  # the mean training image: not flat, and better than flat
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWarning)
        RunScoring(config, train_set, torch.device("cpu")).finish(mean, [{"epoch": 1, "step": 3}], str(tmp_path))


def test_a_run_whose_validation_error_did_not_fall_is_named_untrained(hazelnut, tmp_path):
    import torch

    from models.inference import RunScoring
    from models.networks import fit_mean_image

    config = TrainConfig(root=str(hazelnut), model=ModelConfig(model="ae", size=32, width=4))
    train_set = config.dataset_split("train")
    mean = fit_mean_image(train_set)  # neither flat nor worse than flat: only the history can say

    def finish(*errors: float) -> None:
        history = [{"epoch": e, "step": 3 * e, "val_error": v} for e, v in enumerate(errors, 1)]
        RunScoring(config, train_set, torch.device("cpu")).finish(mean, history, str(tmp_path))
    with pytest.warns(UntrainedWarning, match=r"its validation error did not fall \(0.289 at epoch 1, 0.469 at "
                                              r"epoch 3\)\. Train longer .* \(grad_share in train_log.jsonl"):
        finish(0.289, 0.25, 0.469)  # DAAD+ by SSIM under the paper's weights (tile128-ssim, seed 0)
    with pytest.warns(UntrainedWarning, match="did not fall"):
        finish(0.3, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWarning)
        finish(0.3, 0.35, 0.29)  # fell, after a rise
        finish(0.3)  # one epoch cannot tell


@pytest.mark.parametrize("kind", ["l2", "ssim"])
def test_the_validation_error_is_the_mean_of_the_map_the_run_is_scored_by(hazelnut, kind):
    import torch

    from models.inference import RunScoring
    from models.networks import fit_mean_image
    from models.networks.maps import anomaly_map

    config = TrainConfig(root=str(hazelnut), val_ratio=0.25, anomaly_map=kind, model=ModelConfig(model="ae", size=32))
    model = fit_mean_image(config.dataset_split("train"))
    images = torch.stack([item["image"] for item in config.dataset_split("val")])
    expected = anomaly_map(images, model.score(images).reconstruction, kind).mean().item()
    got = RunScoring(config, config.dataset_split("train"), torch.device("cpu")).validate(model)["val_error"]
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["l2", "ssim"])
def test_a_brighter_reconstruction_is_untrained_by_squared_error_only(hazelnut, tmp_path, kind):
    import torch

    from models.inference import RunScoring
    from models.networks import maps
    from models.networks.detector import Scores

    class Brighter(torch.nn.Module):  # every image's structure exact, 0.6 brighter
        def score(self, x, ali_reduction="sum_sq", anomaly_map="l2"):
            x_hat = x + 0.6
            error_map = maps.anomaly_map(x, x_hat, anomaly_map)
            return Scores(x_hat, error_map, error_map.flatten(1).mean(dim=1), None)

    config = TrainConfig(root=str(hazelnut), anomaly_map=kind, model=ModelConfig(model="ae", size=32))
    scoring = RunScoring(config, config.dataset_split("train"), torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scoring.finish(Brighter(), [{"epoch": 1, "step": 3}], str(tmp_path))
    untrained = [str(w.message) for w in caught if issubclass(w.category, UntrainedWarning)]
    assert (untrained != []) == (kind == "l2")
    assert all("reconstruction error is" in message for message in untrained)


def test_the_log_goes_to_tensorboard_too(hazelnut, tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = ["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4", "--batch", "8",
             "--device", "cpu", "--model", "ae", "--epochs", "2", "--out", str(out)]
    with pytest.warns(UntrainedWarning):
        train.main(flags + ["--log", "tensorboard"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("rec")] == [4, 8]  # by optimisation step (28 images: 4 an epoch)
    assert {"g", "time_s", "grad_share/rec"} <= set(events.Tags()["scalars"])
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2  # the JSON lines as before

    import builtins
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(SystemExit):
        train.main(flags + ["--log", "tensorboard", "--out", str(tmp_path / "b")])
    assert "--log tensorboard needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
