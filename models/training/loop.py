"""The training run: epochs of :class:`~models.training.trainer.Trainer` steps, a log line after
every epoch, a checkpoint and the settings after every epoch or every few minutes, and a clear
error when the run diverges.

What a run measures with its networks (test metrics every few epochs, the calibration of the
scores after the last epoch) is the scoring layer's: it comes in as :class:`RunHooks`
(:class:`models.inference.RunScoring`), so training never imports the scoring.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..data import OneClassDataset
from ..networks import AnomalyDetector
from ..networks.acceleration import FAST_TRAINING, SpeedOptions
from .amp import AMP_DTYPES
from .atomic import write_json
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .distributed import DistContext, agree, barrier, mean_over_processes
from .log import RunLog
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

    def validate(self, model: AnomalyDetector) -> dict[str, float]:
        """The validation error (``val_error``) for the log of every epoch of a run with ``val_ratio``."""

    def calibrate(self, model: AnomalyDetector) -> dict[str, float]:
        """The calibration of the scores, stored in the checkpoint after the last epoch."""

    def finish(self, model: AnomalyDetector, history: list[dict[str, Any]], out: str) -> None:
        """After the last epoch: the learning curves into ``out``, a warning if the model is untrained."""


def plateaued(history: list[dict[str, Any]], window: int, tolerance: float) -> bool:
    """Whether the validation error of the last ``window`` epochs has not improved on the best
    before them by more than ``tolerance`` (relative)."""
    errors = [r["val_error"] for r in history if "val_error" in r]
    if len(errors) <= window:
        return False
    return min(errors[-window:]) > min(errors[:-window]) * (1 - tolerance)


def total_epochs(config: TrainConfig, steps_per_epoch: int) -> int:
    """The epochs a run trains at most: ``epochs``, or those that reach ``steps``."""
    return config.epochs if config.steps is None else -(-config.steps // max(steps_per_epoch, 1))


def epoch_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    """Seed of the augmentation RNG of one epoch on one process: a resumed run repeats it exactly."""
    return int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])


@dataclass(frozen=True)
class RunOptions:
    """How a run trains and logs, besides its settings (never stored: free on resume)."""

    #: Mixed precision: None, "bf16" or "fp16" (:data:`~models.training.amp.AMP_DTYPES`).
    amp: Optional[str] = None
    #: The trainer's speed options (plain with :data:`~models.networks.acceleration.PLAIN`).
    speed: SpeedOptions = FAST_TRAINING
    #: The epochs' numbers as TensorBoard scalars too (:class:`~models.training.log.RunLog`).
    tensorboard: bool = False
    #: The command that continues the run, named in a divergence's message.
    program: str = "python -m models.train"
    #: Minutes of training between checkpoints (0: after every epoch); the last epoch is always
    #: saved. Saving a large model after every one of many short epochs (the division-1 memories
    #: are 0.75 GB at 128x128) can take longer than the training; a kill loses at most this much.
    checkpoint_minutes: float = 0.0

    def __post_init__(self) -> None:
        if not self.checkpoint_minutes >= 0:
            raise ValueError(f"checkpoint_minutes must be >= 0 (0: after every epoch), got {self.checkpoint_minutes}")


def train(config: TrainConfig, out: str, ctx: DistContext, train_set: OneClassDataset, hooks: RunHooks,
          resume: Optional[Resume] = None, options: RunOptions = RunOptions()) -> Trainer:
    """Trains on ``train_set`` (augmented) until the run's stopping rule (``epochs``, ``steps``,
    ``until_plateau``: see :class:`~models.training.TrainConfig`); rank 0 writes to ``out``.

    Raises :class:`~models.training.trainer.DivergenceError` naming the epoch and step where a loss
    or gradient became NaN or infinite, and the command that continues with a lower learning rate;
    that epoch is never saved.
    """
    trainer = Trainer(config, ctx.device, ddp=ctx.distributed, amp=AMP_DTYPES.get(options.amp), speed=options.speed)
    if resume is not None:
        trainer.load_state_dict(resume.state, resume.path)
    # DistributedSampler also in one process: shuffling then depends only on (seed, epoch).
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, seed=config.seed)
    # A last batch of one image breaks BatchNorm on the 1x1 maps of small inputs: drop it.
    loader = DataLoader(train_set, batch_size=config.batch, sampler=sampler, num_workers=config.workers,
                        drop_last=len(sampler) % config.batch == 1, persistent_workers=config.workers > 0)
    checkpoint = os.path.join(out, CHECKPOINT)
    last_saved = resume.path if resume is not None else None
    saved_epoch, saved_at = trainer.epoch, time.monotonic()
    epochs = total_epochs(config, len(loader))
    ended = trainer.history[-1].get("stopped") if trainer.history else None
    plateau_met = (ended == "plateau" and config.until_plateau
                   and trainer.history[-1].get("step", 0) >= config.plateau_min_steps)
    if resume is not None and (trainer.epoch >= epochs or plateau_met):
        if ctx.is_main:
            print(f"{resume.path} has trained {trainer.epoch} epochs already and its stopping rule is met "
                  f"({ended or 'epochs'}): nothing to train; give a larger --epochs or --steps to go on", flush=True)
        return trainer
    # The log restarts from the checkpoint's history: epochs logged after it was saved train again.
    log = RunLog(out, trainer.history, tensorboard=options.tensorboard) if ctx.is_main else None

    def end_epoch(record: dict[str, Any], last: bool) -> None:
        """Counts the epoch; on rank 0 also calibrates after the last, logs, and saves after the
        last or once ``options.checkpoint_minutes`` have passed since the last save."""
        nonlocal last_saved, saved_epoch, saved_at
        if not ctx.is_main:
            trainer.end_epoch(record)
            return
        trainer.end_epoch(record, hooks.calibrate(trainer.model) if last else None)
        if last or time.monotonic() - saved_at >= 60 * options.checkpoint_minutes:
            save_checkpoint(trainer.state_dict(), checkpoint)
            write_json(os.path.join(out, "config.json"), config.to_dict(), indent=2)
            last_saved, saved_epoch, saved_at = checkpoint, trainer.epoch, time.monotonic()
        log.write(record)
        tqdm.write(json.dumps(record), file=sys.stdout)

    stop = None
    if not config.model.learns:  # the mean training image: fitted in one pass, not trained
        trainer.fit(train_set.without_augmentation())
        stop = "fitted"
        end_epoch({"epoch": 1, "step": 0, "stopped": stop}, last=True)
    for epoch in range(trainer.epoch + 1, epochs + 1) if config.model.learns else ():
        sampler.set_epoch(epoch - 1)
        torch.manual_seed(epoch_seed(config, epoch - 1, ctx.rank))
        start, sums, steps = time.perf_counter(), {}, 0
        with tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not ctx.is_main,
                  leave=False, dynamic_ncols=True) as bar:  # closed (cleared) on an error too
            for item in bar:
                steps += 1
                try:
                    losses = trainer.train_step(item["image"].to(ctx.device, non_blocking=True))
                except DivergenceError as e:
                    raise DivergenceError(divergence_message(e, epoch, steps, len(loader), config, out,
                                                             last_saved, saved_epoch, options.program)) from e
                sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
        record = {"epoch": epoch, "step": epoch * len(loader),
                  **mean_over_processes({k: v / max(steps, 1) for k, v in sums.items()}, ctx),
                  "time_s": round(time.perf_counter() - start, 3)}
        if ctx.is_main:
            if config.val_ratio:
                record.update(hooks.validate(trainer.model))
            if config.eval_every and epoch % config.eval_every == 0:
                record.update(hooks.evaluate(trainer.model))
            if (config.until_plateau and record["step"] >= config.plateau_min_steps
                    and plateaued(trainer.history + [record], config.plateau_window, config.plateau_tolerance)):
                stop = "plateau"
        if epoch == epochs and stop is None:
            stop = "steps" if config.steps else "epochs"
        stop = agree(stop, ctx)
        if ctx.is_main and (epoch == 1 or stop) and steps:  # which loss term drives the generator, first and last
            record["grad_share"] = trainer.gradient_shares(item["image"].to(ctx.device))
        if stop:
            record["stopped"] = stop  # why the run ended here: plateau, steps or epochs
        end_epoch(record, last=bool(stop))
        barrier(ctx)
        if stop:
            break
    if ctx.is_main:
        log.close()
        if stop:
            hooks.finish(trainer.model, trainer.history, out)
    return trainer


def divergence_message(error: DivergenceError, epoch: int, step: int, steps: int, config: TrainConfig,
                       out: str, last_saved: Optional[str], saved_epoch: int, program: str) -> str:
    """What diverged, where, what was kept, and the command to go on with a lower learning rate."""
    lower = f"--lr {config.learning_rate / 10:g}"
    if last_saved is None:
        kept = f"no checkpoint was written yet; start again with a lower rate, e.g. {lower}"
    else:
        kept = (f"{last_saved} (epoch {saved_epoch}) was kept as it was; continue from it with a lower "
                f"rate: {program} --resume {last_saved} --out {out} {lower}")
    return (f"training diverged at epoch {epoch}, step {step} of {steps}: {error} (learning rate "
            f"{config.learning_rate:g}). {kept}")

