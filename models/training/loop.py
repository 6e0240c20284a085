"""The training run: epochs of :class:`~models.training.trainer.Trainer` steps, a checkpoint, the
settings and a log line after every epoch, and a clear error when the run diverges.

What a run measures with its networks (test metrics every few epochs, the calibration of the
scores after the last epoch) is the scoring layer's: it comes in as :class:`RunHooks`
(:class:`models.inference.RunScoring`), so training never imports the scoring.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..data import OneClassDataset
from ..networks import AnomalyDetector
from .amp import AMP_DTYPES
from .atomic import write_json
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .distributed import DistContext, barrier, mean_over_processes
from .trainer import DivergenceError, Trainer

CHECKPOINT = "checkpoint.pt"


class Resume(NamedTuple):
    """The checkpoint a run continues from, and its path."""

    state: dict[str, Any]
    path: str


class RunHooks(Protocol):
    """What a run measures with its networks, on rank 0 (:class:`models.inference.RunScoring`)."""

    def evaluate(self, model: AnomalyDetector) -> dict[str, Any]:
        """Test metrics for the log of an epoch that ``eval_every`` names."""

    def calibrate(self, model: AnomalyDetector) -> dict[str, float]:
        """The calibration of the scores, stored in the checkpoint after the last epoch."""


def epoch_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    """Seed of the augmentation RNG of one epoch on one process: a resumed run repeats it exactly."""
    return int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])


def write_log(out: str, record: dict) -> None:
    with open(os.path.join(out, "train_log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, out: str, ctx: DistContext, train_set: OneClassDataset, hooks: RunHooks,
          resume: Optional[Resume] = None, amp: Optional[str] = None,
          program: str = "python -m models.train") -> Trainer:
    """Trains on ``train_set`` (augmented) up to ``config.epochs`` epochs; rank 0 writes to ``out``.

    Raises :class:`~models.training.trainer.DivergenceError` naming the epoch and step where a loss
    or gradient became NaN or infinite, and the ``program`` command that continues with a lower
    learning rate; that epoch is never saved.
    """
    trainer = Trainer(config, ctx.device, ddp=ctx.distributed, amp=AMP_DTYPES.get(amp))
    if resume is not None:
        trainer.load_state_dict(resume.state, resume.path)
    # DistributedSampler also in one process: shuffling then depends only on (seed, epoch).
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, seed=config.seed)
    # A last batch of one image breaks BatchNorm on the 1x1 maps of small inputs: drop it.
    loader = DataLoader(train_set, batch_size=config.batch, sampler=sampler, num_workers=config.workers,
                        drop_last=len(sampler) % config.batch == 1, persistent_workers=config.workers > 0)
    checkpoint = os.path.join(out, CHECKPOINT)
    last_saved = resume.path if resume is not None else None
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
        if resume is None:  # a fresh run starts a fresh log
            open(os.path.join(out, "train_log.jsonl"), "w").close()
    for epoch in range(trainer.epoch + 1, config.epochs + 1):
        sampler.set_epoch(epoch - 1)
        torch.manual_seed(epoch_seed(config, epoch - 1, ctx.rank))
        start, sums, steps = time.perf_counter(), {}, 0
        with tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not ctx.is_main,
                  leave=False, dynamic_ncols=True) as bar:  # closed (cleared) on an error too
            for item in bar:
                steps += 1
                try:
                    losses = trainer.train_step(item["image"].to(ctx.device, non_blocking=True))
                except DivergenceError as e:
                    raise DivergenceError(divergence_message(e, epoch, steps, len(loader), config, out,
                                                             last_saved, trainer.epoch, program)) from e
                sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
        record = {"epoch": epoch, **mean_over_processes({k: v / max(steps, 1) for k, v in sums.items()}, ctx),
                  "time_s": round(time.perf_counter() - start, 3)}
        if ctx.is_main:
            if epoch in (1, config.epochs) and steps:  # which loss term drives the generator
                record["grad_share"] = trainer.gradient_shares(item["image"].to(ctx.device))
            if config.eval_every and epoch % config.eval_every == 0:
                record.update(hooks.evaluate(trainer.model))
            trainer.end_epoch(record, hooks.calibrate(trainer.model) if epoch == config.epochs else None)
            save_checkpoint(trainer.state_dict(), checkpoint)
            write_json(os.path.join(out, "config.json"), config.to_dict(), indent=2)
            write_log(out, record)
            tqdm.write(json.dumps(record), file=sys.stdout)
        else:
            trainer.end_epoch(record)
        barrier(ctx)
        last_saved = checkpoint
    return trainer


def divergence_message(error: DivergenceError, epoch: int, step: int, steps: int, config: TrainConfig,
                       out: str, last_saved: Optional[str], saved_epoch: int, program: str) -> str:
    """What diverged, where, what was kept, and the command to go on with a lower learning rate."""
    lower = f"--lr {config.learning_rate / 10:g}"
    if last_saved is None:
        kept = f"no checkpoint was written (no epoch finished); start again with a lower rate, e.g. {lower}"
    else:
        kept = (f"{last_saved} (epoch {saved_epoch}) was kept as it was; continue from it with a lower "
                f"rate: {program} --resume {last_saved} --out {out} {lower}")
    return (f"training diverged at epoch {epoch}, step {step} of {steps}: {error} (learning rate "
            f"{config.learning_rate:g}). {kept}")

