"""Train a detector: ``python -m models.train --dataset mvtec --root DATA --model daad+ --out DIR``.

Writes to ``--out``: ``checkpoint.pt`` and ``config.json`` (atomically, after every epoch: all
state, and the settings it was trained with) and ``train_log.jsonl`` (one line of mean losses, time and, with
``--eval-every``, test metrics per epoch). ``--resume`` continues the run in ``--out``.
Every image is decoded before the first step: unreadable files stop the run at once, listed
(``--skip-bad-images`` leaves them out instead). A NaN or infinite loss or gradient stops the run
at that step with an error naming it; the last checkpoint, of the last finished epoch, is kept
as it was, and ``--resume --lr SMALLER`` continues from it.
Under ``torchrun --nproc_per_node K`` the same command trains with DistributedDataParallel
(``--batch`` is per process; rank 0 writes).

Example (about 6 minutes on one CPU core):
    python -m models.train --dataset mvtec --root ../shared/data/mvtec_hazelnut_subset \\
        --model daad --size 64 --width 16 --division 2 2 1 --epochs 200 --eval-every 50 \\
        --out runs/hazelnut
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .amp import AMP_DTYPES
from .atomic import write_json
from .checkpoint import load_checkpoint, save_checkpoint, stored_config
from .config import DEFAULT_READING, LOSS_READINGS, MODEL_NAMES, ModelConfig, TrainConfig
from .data import DATASETS, OneClassDataset, config_dataset, dataset_channels
from .distributed import (DistContext, barrier, mean_over_processes, setup_distributed,
                          teardown_distributed)
from .inference import calibration, collect_scores, compute_metrics
from .losses import ALI_REDUCTIONS, REC_REDUCTIONS
from .trainer import DivergenceError, Trainer

MODEL_FIELDS = ("model", "size", "width", "division", "num_items", "backend")
#: Settings a resumed run may change; the others come from the checkpoint. ``lr``: to go on
#: with a lower rate after a divergence.
RESUMABLE = ("root", "epochs", "workers", "eval_every", "lr")
#: Flags of this invocation only: never stored, free on --resume.
INVOCATION = ("device", "out", "resume", "skip_bad_images", "amp")
CHECKPOINT = "checkpoint.pt"


class Resume(NamedTuple):
    """The checkpoint a run continues from, and its path."""

    state: dict[str, Any]
    path: str


def build_parser() -> argparse.ArgumentParser:
    t, m = TrainConfig(), ModelConfig()
    p = argparse.ArgumentParser(
        prog="python -m models.train", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)  # unset flags stay unset: --resume can tell them apart
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help=f"data layout (default: {t.dataset}); see models/data.py")
    data.add_argument("--root", help="data folder: an MVTec AD category, the MNIST/CIFAR root or an image folder")
    data.add_argument("--category", help="sub-folder of --root to use (an MVTec AD category)")
    data.add_argument("--normal-class", type=int, help=f"MNIST/CIFAR-10 class that is normal (default: {t.normal_class})")
    data.add_argument("--normal-dir", help="folder data set: folder of normal images below --root")
    data.add_argument("--abnormal-dirs", nargs="+", help="folder data set: folders of abnormal images below --root")
    data.add_argument("--mask-dir", help="folder data set: folder of masks below --root (default: beside the images)")
    data.add_argument("--train-ratio", type=float,
                      help=f"folder data set: share of the normal images used for training (default: {t.train_ratio})")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="leave unreadable image files out with a warning (default: stop, listing them)")
    net = p.add_argument_group("model")
    net.add_argument("--model", choices=MODEL_NAMES, help=f"variant; '+' adds the discriminator (default: {m.model})")
    net.add_argument("--size", type=int, help=f"input size, a multiple of 16*lcm(RH, RW) (default: {m.size})")
    net.add_argument("--width", type=int, help=f"width multiplier, 64 in the paper (default: {m.width})")
    net.add_argument("--division", type=int, nargs=3, metavar=("RH", "RW", "RC"),
                     help=f"division rates of every memory (default: {' '.join(map(str, m.division))})")
    net.add_argument("--num-items", type=int, help=f"memory items N per memory (default: {m.num_items})")
    net.add_argument("--backend", help=f"daad_ext backend of every memory: auto, reference, cpu, cuda, ... (default: {m.backend})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"total epochs, also when resuming (default: {t.epochs})")
    opt.add_argument("--batch", type=int, help=f"batch size per process (default: {t.batch})")
    opt.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-4, 2e-4 for '+' variants)")
    opt.add_argument("--betas", type=float, nargs=2, help=f"Adam betas (default: {' '.join(map(str, t.betas))})")
    opt.add_argument("--weight-decay", type=float, help=f"(default: {t.weight_decay})")
    opt.add_argument("--loss-weights", type=float, nargs=3, metavar=("REC", "ADV", "ALI"),
                     help="generator loss weights (default: those of --losses)")
    opt.add_argument("--losses", choices=sorted(LOSS_READINGS),
                     help=f"named reading of the losses: sets --rec-loss, --ali-loss, --d-reset and --loss-weights "
                          f"where not given (default: {DEFAULT_READING} with a discriminator, old without); "
                          "see docs/MODELS.md")
    opt.add_argument("--rec-loss", choices=REC_REDUCTIONS, help="reading of L_rec (default: that of --losses); see models/losses.py")
    opt.add_argument("--ali-loss", choices=ALI_REDUCTIONS, help="reading of L_ali and of the score L(x) (default: that of --losses)")
    opt.add_argument("--d-reset", type=float,
                     help="re-initialise the discriminator when its loss falls below this (0: never; default: that of --losses)")
    opt.add_argument("--entropy-weight", type=float, help="MemAE entropy loss weight (default: 0.0002 for memae, else 0)")
    opt.add_argument("--gamma", type=float, help="score fusion weight of R (default: 0.9 with a discriminator, else 1)")
    opt.add_argument("--seed", type=int, help=f"(default: {t.seed})")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, help=f"data loader processes (default: {t.workers})")
    run.add_argument("--eval-every", type=int, help="evaluate on the test split every N epochs (default: 0, never)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    run.add_argument("--amp", nargs="?", const="bf16", choices=AMP_DTYPES,
                     help="mixed precision: bf16 (CPU, CUDA; the default with a bare --amp) or fp16 "
                          "(CUDA, with gradient scaling); not stored, give it again with --resume")
    run.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    run.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                     help=f"continue from CHECKPOINT (default: OUT/{CHECKPOINT}) with its settings")
    return p


def make_config(args: argparse.Namespace) -> tuple[TrainConfig, Optional[Resume]]:
    """The run's settings and, when resuming, the checkpoint they come from."""
    given = {k: v for k, v in vars(args).items() if k not in INVOCATION}
    if "resume" in args:
        path = args.resume or os.path.join(args.out, CHECKPOINT)
        state = load_checkpoint(path)
        fixed = sorted(set(given) - set(RESUMABLE))
        if fixed:
            raise ValueError(f"--resume takes the settings from the checkpoint; only "
                             f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may be given, "
                             f"not {', '.join('--' + k.replace('_', '-') for k in fixed)}")
        return replace(stored_config(state, path), **given), Resume(state, path)
    if "root" not in given:
        raise ValueError("--root is required (the data folder)")
    preset = LOSS_READINGS[given.pop("losses")] if "losses" in given else {}
    for key, value in preset.items():
        given.setdefault(key, value)
    model = {k: given.pop(k) for k in MODEL_FIELDS if k in given}
    model["in_channels"] = dataset_channels(given.get("dataset", TrainConfig.dataset))
    return TrainConfig(model=ModelConfig(**model), **given), None


def epoch_seed(config: TrainConfig, epoch: int, rank: int) -> int:
    """Seed of the augmentation RNG of one epoch on one process: a resumed run repeats it exactly."""
    return int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])


def write_log(out: str, record: dict) -> None:
    with open(os.path.join(out, "train_log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, out: str, ctx: DistContext, train_set: OneClassDataset,
          resume: Optional[Resume] = None, skip_bad_images: bool = False,
          amp: Optional[str] = None) -> Trainer:
    """Trains on ``train_set`` (augmented) up to ``config.epochs`` epochs; rank 0 writes to ``out``.

    Raises :class:`~models.trainer.DivergenceError` naming the epoch and step where a loss or
    gradient became NaN or infinite; that epoch is never saved.
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
    test_set = None  # built (and its files checked) at the first evaluation
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
                                                             last_saved, trainer.epoch)) from e
                sums = {k: sums.get(k, 0.0) + v for k, v in losses.items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
        record = {"epoch": epoch, **mean_over_processes({k: v / max(steps, 1) for k, v in sums.items()}, ctx),
                  "time_s": round(time.perf_counter() - start, 3)}
        if ctx.is_main:
            if epoch in (1, config.epochs) and steps:  # which loss term drives the generator
                record["grad_share"] = trainer.gradient_shares(item["image"].to(ctx.device))
            if config.eval_every and epoch % config.eval_every == 0:
                test_set = test_set or config_dataset(config, "test", skip_bad_images=skip_bad_images)
                scores = collect_scores(trainer.model, test_set, ctx.device, config.batch, config.ali_loss)
                metrics = compute_metrics(scores, config.fusion_gamma)
                record.update(image_auroc=metrics["image_auroc"], pixel_auroc=metrics["pixel_auroc"])
            calib = None
            if epoch == config.epochs:
                plain = train_set.without_augmentation()
                calib = calibration(collect_scores(trainer.model, plain, ctx.device, config.batch, config.ali_loss))
            trainer.end_epoch(record, calib)
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
                       out: str, last_saved: Optional[str], saved_epoch: int) -> str:
    """What diverged, where, what was kept, and the command to go on with a lower learning rate."""
    lower = f"--lr {config.learning_rate / 10:g}"
    if last_saved is None:
        kept = f"no checkpoint was written (no epoch finished); start again with a lower rate, e.g. {lower}"
    else:
        kept = (f"{last_saved} (epoch {saved_epoch}) was kept as it was; continue from it with a lower "
                f"rate: python -m models.train --resume {last_saved} --out {out} {lower}")
    return (f"training diverged at epoch {epoch}, step {step} of {steps}: {error} (learning rate "
            f"{config.learning_rate:g}). {kept}")


def main(argv: Optional[Sequence[str]] = None) -> Trainer:
    """Runs the command line; returns the trainer (its ``model`` holds the trained networks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    skip_bad_images = getattr(args, "skip_bad_images", False)
    try:  # bad flags, paths, sizes, images and checkpoints end here with a message naming them
        config, resume = make_config(args)
        train_set = config_dataset(config, "train", augment=True, skip_bad_images=skip_bad_images)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    ctx = setup_distributed(args.device)
    try:
        return train(config, args.out, ctx, train_set, resume, skip_bad_images, getattr(args, "amp", None))
    except DivergenceError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
