"""models/training/checkpoint.py: checkpoint files, including damaged, edited and inconsistent
ones, and atomic saves (models/training/atomic.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from models.networks import ModelConfig
from models.training import TrainConfig, Trainer, atomic
from models.training.checkpoint import (CheckpointError, UnverifiedCheckpointWarning, load_checkpoint,
                                        load_detector, save_checkpoint)

pytestmark = pytest.mark.usefixtures("single_thread")


SMALL = ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1), num_items=16)


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
