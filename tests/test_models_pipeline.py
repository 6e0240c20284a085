"""models/: train, evaluate and predict end to end on the real hazelnut subset; resume; CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import evaluate, predict, train
from models.checkpoint import load_checkpoint
from models_support import HAZELNUT, needs_hazelnut, single_thread  # noqa: F401  (autouse fixture)

pytestmark = needs_hazelnut
TINY = ["--dataset", "mvtec", "--root", str(HAZELNUT), "--size", "32", "--width", "4",
        "--division", "2", "2", "1", "--num-items", "20", "--batch", "8", "--device", "cpu"]


def test_train_evaluate_predict(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = train.main(TINY + ["--model", "daad+", "--epochs", "2", "--eval-every", "1", "--out", str(out)])
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["model"]["model"] == "daad+"
    assert set(state) >= {"generator", "discriminator", "opt_g", "opt_d", "history", "calibration"}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 <= r["image_auroc"] <= 1 and 0 <= r["pixel_auroc"] <= 1 for r in log)
    assert {"rec", "adv", "ali", "d", "g", "time_s"} <= set(log[0])
    assert trainer.epoch == 2

    result = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "eval"),
                            "--root", str(HAZELNUT), "--num-heatmaps", "4", "--device", "cpu"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    assert metrics["image_auroc"] == pytest.approx(log[-1]["image_auroc"]) == result["image_auroc"]
    assert len(metrics["images"]) == 23 and metrics["gamma"] == 0.9
    assert {"score", "rec", "feat", "label", "name"} <= set(metrics["images"][0])
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 0
    heatmaps = sorted(p.name for p in (tmp_path / "eval" / "heatmaps").iterdir())
    assert len(heatmaps) == 4 and sum("anomalous" in n for n in heatmaps) == 2

    images = [str(HAZELNUT / "test" / "colour" / "00.jpg"), str(HAZELNUT / "test" / "good" / "04.jpg")]
    results = predict.main([str(out / "checkpoint.pt"), *images, "--out", str(tmp_path / "pred"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert all(img in printed and "score=" in printed for img in images)
    assert [Path(r["heatmap"]).name for r in results] == ["00_heatmap.png", "04_heatmap.png"]
    assert all((tmp_path / "pred" / n).stat().st_size > 0 for n in ("00_heatmap.png", "04_heatmap.png"))


def test_resume_continues_exactly(tmp_path):
    args = TINY + ["--model", "memae+", "--seed", "3"]
    straight = train.main(args + ["--epochs", "2", "--out", str(tmp_path / "a")])
    train.main(args + ["--epochs", "1", "--out", str(tmp_path / "b")])
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt").get("calibration") is not None
    resumed = train.main(["--resume", "--epochs", "2", "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert resumed.epoch == 2 and len(resumed.history) == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2]


def test_cli_errors(tmp_path, capsys):
    def error_of(module, argv):
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        assert exc.value.code == 2
        return capsys.readouterr().err

    assert "valid sizes are the multiples of 128" in error_of(train, TINY + ["--model", "daad", "--division", "8", "8", "1", "--size", "64", "--out", str(tmp_path)])
    assert "dataset root not found" in error_of(train, ["--root", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert "--root is required" in error_of(train, ["--out", str(tmp_path)])
    assert "checkpoint not found" in error_of(train, ["--resume", "--out", str(tmp_path)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    assert "not a readable PyTorch checkpoint" in error_of(evaluate, ["--checkpoint", str(bad), "--out", str(tmp_path)])
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    assert "not a checkpoint of models.train" in error_of(predict, [str(tmp_path / "foreign.pt"), "x.png"])
    train.main(TINY + ["--model", "ae", "--epochs", "1", "--out", str(tmp_path / "run")])
    assert "only --root, --epochs" in error_of(train, ["--resume", "--model", "daad", "--out", str(tmp_path / "run")])
    assert "image not found" in error_of(predict, [str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "x.png")])
