"""models/: train, evaluate and predict end to end on the real hazelnut subset; resume; CLI errors."""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from models import evaluate, predict, train
from models.data import DataWarning
from models.training import load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def tiny(hazelnut):
    """Flags of a tiny training on the hazelnut subset (a second an epoch)."""
    return ["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
            "--division", "2", "2", "1", "--num-items", "20", "--batch", "8", "--device", "cpu"]


def error_of(module, argv, capsys, code=2):
    """The message of a command line that must fail with exit status ``code``."""
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == code
    return capsys.readouterr().err


def test_train_evaluate_predict(hazelnut, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = train.main(tiny + ["--model", "daad+", "--epochs", "2", "--eval-every", "1", "--out", str(out)])
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["model"]["model"] == "daad+"
    assert set(state) >= {"generator", "discriminator", "opt_g", "opt_d", "history", "calibration"}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 for r in log)
    assert {"rec", "adv", "ali", "d", "g", "time_s"} <= set(log[0])
    assert trainer.epoch == 2

    result = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"),
                            "--root", str(hazelnut), "--num-heatmaps", "4", "--device", "cpu"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    assert metrics["image_auroc"] == pytest.approx(log[-1]["image_auroc"]) == result["image_auroc"]
    assert len(metrics["images"]) == 23 and metrics["gamma"] == 0.9
    assert {"score", "rec", "feat", "label", "name"} <= set(metrics["images"][0])
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0
    heatmaps = sorted(p.name for p in (tmp_path / "eval" / "heatmaps").iterdir())
    assert len(heatmaps) == 4 and sum("_anomalous_colour_" in n for n in heatmaps) == 2  # the defect type
    peak = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval-max"),
                          "--num-heatmaps", "0", "--device", "cpu", "--image-score", "max", "--smooth-maps"])
    assert peak["image_score"] == "max" and peak["sigma"] == 0.5 and peak["pixel_smoothed"]  # 4 * 32 / 256
    assert peak["image_auroc_max"] == pytest.approx(metrics["image_auroc_max"])
    assert peak["pixel_auroc"] != metrics["pixel_auroc"]

    images = [str(hazelnut / "test" / "colour" / "00.jpg"), str(hazelnut / "test" / "good" / "04.jpg")]
    by_max = predict.predict(str(out / "checkpoint.pt"), images, str(tmp_path / "pred-max"), "cpu", "max")
    assert all(0 <= r["score"] <= 1 for r in by_max["predictions"])
    results = predict.main([str(out / "checkpoint.pt"), *images, "--out", str(tmp_path / "pred"),
                            "--device", "cpu"])["predictions"]
    printed = capsys.readouterr().out
    assert all(img in printed and "score=" in printed for img in images)
    assert [Path(r["heatmap"]).name for r in results] == ["00_heatmap.png", "04_heatmap.png"]
    assert all((tmp_path / "pred" / n).stat().st_size > 0 for n in ("00_heatmap.png", "04_heatmap.png"))


def test_resume_continues_exactly(tiny, tmp_path):
    args = tiny + ["--model", "memae+", "--seed", "3"]
    straight = train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")])
    train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")])
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt").get("calibration") is not None
    resumed = train.main(["--resume", "--epochs", "2", "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert resumed.epoch == 2 and len(resumed.history) == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]


def test_checkpoints_every_few_minutes_and_a_log_that_restarts_from_the_checkpoint(tiny, tmp_path, monkeypatch):
    import models.training.loop as loop
    saved = []
    save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda state, path: (saved.append(state["epoch"]), save(state, path)))
    args = tiny + ["--model", "ae", "--out", str(tmp_path / "run")]
    train.main(args + ["--epochs", "2"])
    assert saved == [1, 2]  # by default after every epoch
    saved.clear()
    train.main(args + ["--epochs", "3", "--checkpoint-minutes", "60"])
    assert saved == [3]  # an hour apart: only the last epoch
    # A kill after an epoch logged but not saved: the resumed run trains it again, logged once.
    log = tmp_path / "run" / "train_log.jsonl"
    shutil.copy(tmp_path / "run" / "checkpoint.pt", tmp_path / "epoch3.pt")
    train.main(["--resume", "--epochs", "4", "--out", str(tmp_path / "run"), "--device", "cpu"])
    shutil.copy(tmp_path / "epoch3.pt", tmp_path / "run" / "checkpoint.pt")  # epoch 4 logged, not kept
    train.main(["--resume", "--epochs", "5", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 5

def test_cli_errors(tiny, tmp_path, capsys):
    assert "valid sizes are the multiples of 128" in error_of(train, tiny + ["--model", "daad", "--division", "8", "8", "1", "--size", "64", "--out", str(tmp_path)], capsys)
    assert "dataset root not found" in error_of(train, ["--root", str(tmp_path / "none"), "--out", str(tmp_path)], capsys)
    assert "--root is required" in error_of(train, ["--out", str(tmp_path)], capsys)
    assert "checkpoint not found" in error_of(train, ["--resume", "--out", str(tmp_path)], capsys)
    assert "checkpoint_minutes must be >= 0" in error_of(train, tiny + ["--checkpoint-minutes", "-1", "--out", str(tmp_path)], capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    assert "not a readable PyTorch checkpoint" in error_of(evaluate, ["--checkpoint", str(bad), "--out", str(tmp_path)], capsys)
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    assert "not a checkpoint of models.train" in error_of(predict, [str(tmp_path / "foreign.pt"), "x.png"], capsys)
    train.main(tiny + ["--model", "ae", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "only --root, --epochs" in error_of(train, ["--resume", "--model", "daad", "--out", str(tmp_path / "run")], capsys)
    assert "image not found" in error_of(predict, [str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "x.png")], capsys)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert f"{text}: UnidentifiedImageError" in error_of(predict, [str(tmp_path / "run" / "checkpoint.pt"), str(text)], capsys)


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny + ["--model", "daad+", "--out", str(out)]
    train.main(args + ["--epochs", "1"])
    checkpoint = out / "checkpoint.pt"
    good = checkpoint.read_bytes()
    message = error_of(train, ["--resume", "--epochs", "3", "--lr", "1e6", "--out", str(out)], capsys, code=1)
    assert "error: training diverged at epoch 2, step " in message
    assert "non-finite" in message and "(learning rate 1e+06)" in message
    assert f"{checkpoint} (epoch 1) was kept as it was" in message
    assert f"python -m models.train --resume {checkpoint} --out {out} --lr 100000" in message
    assert checkpoint.read_bytes() == good  # never overwritten with broken weights
    assert json.loads((out / "config.json").read_text())["lr"] is None  # still the checkpoint's settings
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    resumed = train.main(["--resume", "--epochs", "2", "--lr", "1e-4", "--out", str(out), "--device", "cpu"])
    assert resumed.epoch == 2 and load_checkpoint(checkpoint)["epoch"] == 2
    assert [group["lr"] for group in resumed.opt_g.param_groups] == [1e-4]
    # A fresh run that diverges in its first epoch has no checkpoint to offer.
    fresh = error_of(train, args[:-1] + [str(tmp_path / "fresh"), "--epochs", "1", "--lr", "1e6"], capsys, code=1)
    assert "training diverged at epoch 1" in fresh and "no checkpoint was written" in fresh
    assert not (tmp_path / "fresh" / "checkpoint.pt").exists()


def test_bad_images_stop_before_training_or_are_skipped(hazelnut, tiny, tmp_path, capsys):
    root = tmp_path / "hazelnut"
    shutil.copytree(hazelnut, root)
    (root / "train" / "good" / "00.jpg").write_bytes((hazelnut / "train" / "good" / "00.jpg").read_bytes()[:5000])
    (root / "test" / "good" / "04.jpg").write_text("not an image")
    flags = tiny[:2] + ["--root", str(root)] + tiny[4:] + ["--model", "ae", "--epochs", "1"]
    message = error_of(train, flags + ["--out", str(tmp_path / "run")], capsys)
    assert "1 unreadable image file:" in message and "00.jpg: OSError: Truncated File Read" in message
    assert not (tmp_path / "run").exists()  # stopped before anything was written
    with pytest.warns(DataWarning) as caught:
        trainer = train.main(flags + ["--eval-every", "1", "--skip-bad-images", "--out", str(tmp_path / "run")])
    caught = [w for w in caught if issubclass(w.category, DataWarning)]  # not the untrained warning
    assert ["00.jpg" in str(w.message) for w in caught] == [True, False]  # the training set's
    assert ["04.jpg" in str(w.message) for w in caught] == [False, True]  # the test set's, at evaluation
    assert trainer.epoch == 1
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert "04.jpg: UnidentifiedImageError" in error_of(evaluate, ["--checkpoint", checkpoint, "--out", str(tmp_path / "eval")], capsys)
    with pytest.warns(DataWarning, match="04.jpg"):
        result = evaluate.main(["--checkpoint", checkpoint, "--out", str(tmp_path / "eval"), "--skip-bad-images"])
    assert result["num_images"] == 22


def test_resume_from_weights_that_cannot_be_used_ends_with_a_message(tiny, tmp_path, capsys):
    from models.training import save_checkpoint

    out = tmp_path / "run"
    train.main(tiny + ["--model", "ae", "--epochs", "1", "--out", str(out)])
    checkpoint = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    state.pop("format")
    name = next(iter(state["generator"]))
    nan = torch.full_like(state["generator"][name], math.nan)
    capsys.readouterr()
    cases = {"non-finite (NaN or infinite) generator weights": {**state["generator"], name: nan},
             "lacks the generator state": {},
             "do not fit its generator state": {**state["generator"], name: torch.zeros(3)}}
    for expected, weights in cases.items():
        save_checkpoint({**state, "generator": weights}, tmp_path / "bad.pt")
        message = error_of(train, ["--resume", str(tmp_path / "bad.pt"), "--epochs", "2", "--out", str(out)],
                           capsys, code=1)
        assert expected in message and str(tmp_path / "bad.pt") in message and "Traceback" not in message
    assert load_checkpoint(checkpoint)["epoch"] == 1
    done = train.main(["--resume", "--epochs", "1", "--out", str(out)])  # nothing left to train: said
    assert done.epoch == 1 and "has trained 1 epochs already and its stopping rule is met (epochs): nothing to " \
        "train" in capsys.readouterr().out
    assert "epochs and batch must be >= 1, got 0" in error_of(train, tiny + ["--epochs", "0", "--out", str(out)], capsys)


def test_a_save_that_hits_a_file_size_limit_keeps_the_checkpoint_and_says_why(tiny, tmp_path):
    """A file-size limit (as a full disk) during the save: one message naming the file and the
    cause, no traceback, and the previous checkpoint intact and resumable."""
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    train.main(tiny + ["--model", "ae", "--epochs", "1", "--out", str(out)])
    checkpoint = out / "checkpoint.pt"
    before = checkpoint.read_bytes()

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    done = subprocess.run([sys.executable, "-m", "models.train", "--resume", "--epochs", "2", "--out", str(out),
                           "--device", "cpu"], preexec_fn=limited, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1, done.stderr
    assert f"cannot write {checkpoint}: File too large; the previous file is kept as it was" in done.stderr
    assert "Traceback" not in done.stderr
    assert checkpoint.read_bytes() == before and load_checkpoint(checkpoint)["epoch"] == 1


def test_commands_name_themselves_as_the_user_runs_them():
    from models import cli

    assert cli.program("models", "train") == "python -m models.train"
    assert cli.program("daad_models", "train") == "daad-train"
    for module in (train, evaluate, predict):
        installed = cli.command_parser(module.__doc__, "daad_models", module.__name__.rsplit(".", 1)[1])
        assert installed.prog.startswith("daad-") and "python -m models" not in installed.format_help()
    assert train.build_parser().prog == "python -m models.train"  # from the checkout


def test_a_saved_run_reruns_from_its_config_file_with_flags_overriding(tiny, tmp_path, capsys):
    train.main(tiny + ["--model", "ae", "--epochs", "1", "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    rerun = train.main(["--config", str(tmp_path / "a" / "config.json"), "--epochs", "2", "--width", "8",
                        "--device", "cpu", "--out", str(tmp_path / "b")])
    again = json.loads((tmp_path / "b" / "config.json").read_text())
    assert again["epochs"] == 2 and again["model"]["width"] == 8 and rerun.epoch == 2
    assert {k: v for k, v in again.items() if k not in ("epochs", "model")} == \
        {k: v for k, v in saved.items() if k not in ("epochs", "model")}
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 1, "colour": "red"}')
    assert f"{bad}: unknown training settings ['colour']" in error_of(train, ["--config", str(bad)], capsys)
    bad.write_text("{not json")
    assert "is not valid JSON" in error_of(train, ["--config", str(bad)], capsys)
    assert "cannot read the settings file" in error_of(train, ["--config", str(tmp_path / "none.json")], capsys)


def test_the_detector_that_learns_nothing_is_a_model_of_the_commands(tiny, hazelnut, tmp_path):
    """``--model mean-image``: one command tells whether a data set can rank detectors at all."""
    from models import export
    from models.data import build_dataset
    from models.inference.run_scoring import UntrainedWarning

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWarning)  # the mean image is not flat
        trainer = train.main(tiny[:6] + ["--model", "mean-image", "--device", "cpu", "--out", str(out)])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert trainer.epoch == 1 and log == [{"epoch": 1, "step": 0, "stopped": "fitted"}]
    images = torch.stack([item["image"] for item in build_dataset("mvtec", str(hazelnut), "train", 32)])
    torch.testing.assert_close(trainer.model.generator.mean, images.double().mean(0).float())
    result = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"),
                            "--num-heatmaps", "2", "--device", "cpu"])
    assert result["model"] == "mean-image" and 0 <= result["image_auroc"] <= 1
    image = str(hazelnut / "test" / "colour" / "00.jpg")
    report = predict.predict(str(out / "checkpoint.pt"), [image], str(tmp_path / "pred"), "cpu")
    assert math.isfinite(report["predictions"][0]["score"])
    assert export.main(["--checkpoint", str(out / "checkpoint.pt"), "--format", "pt2", "--out", str(tmp_path / "g")])
