"""models/: ``python -m models.train`` under a torchrun-like launch of 2 CPU processes (gloo)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from models import train
from models.training import TrainConfig, Trainer, load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """One process: torchrun's environment, then the command line's own entry point."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = train.main(["--dataset", "mvtec", "--root", root, "--model", "daad+", "--size", "32",
                          "--width", "4", "--division", "2", "2", "1", "--num-items", "20", "--batch", "4",
                          "--epochs", "1", "--device", "cpu", "--out", out])
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    torch.save(params, os.path.join(out, f"params-rank{rank}.pt"))


def test_two_processes_keep_identical_replicas(hazelnut, tmp_path):
    mp.spawn(run_rank, args=(2, free_port(), str(hazelnut), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"params-rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    # Rank 0 wrote the checkpoint, holding the trained parameters.
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    for name, value in rank0.items():
        module, key = name.split(".", 1)
        torch.testing.assert_close(state[module][key], value, rtol=0, atol=0, msg=name)
    # The replicas did train: they moved away from the seed's initial weights.
    initial = Trainer(TrainConfig.from_dict(state["config"]), torch.device("cpu")).model
    assert rank0.keys() == dict(initial.named_parameters()).keys()
    assert all(not torch.equal(rank0[n], p) for n, p in initial.named_parameters() if "memory" in n)
