"""Data-parallel training through PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group uses NCCL on GPUs and
gloo on CPUs; each process drives one device; rank 0 writes checkpoints and logs.

Example:
    >>> from models.training.distributed import setup_distributed
    >>> setup_distributed("cpu")  # a single process: no process group
    DistContext(rank=0, world_size=1, device=device(type='cpu'))
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist


class DistContext(NamedTuple):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """"auto" is the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def setup_distributed(device: str = "auto") -> DistContext:
    """Joins the process group when launched by torchrun and picks this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    if world_size == 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), world_size, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_over_processes(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """The mean of each value over all processes (the values themselves in a single process)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / ctx.world_size).tolist()))


def agree(value: Optional[str], ctx: DistContext) -> Optional[str]:
    """Rank 0's ``value`` on every process (a decision such as "stop here", which rank 0 makes)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
