"""Train a detector: ``python -m models.train --dataset mvtec --root DATA --model daad+ --out DIR``.

Writes to ``--out``: ``checkpoint.pt`` and ``config.json`` (atomically, after every epoch or every
``--checkpoint-minutes``, and after the last: all state, and the settings it was trained with) and
``train_log.jsonl`` (one line of mean losses, time and, with ``--eval-every``, test metrics per
epoch). ``--resume`` continues the run in ``--out`` from its checkpoint.
Every image is decoded before the first step: unreadable files stop the run at once, listed
(``--skip-bad-images`` leaves them out instead). A NaN or infinite loss or gradient stops the run
at that step with an error naming it; the last checkpoint is kept as it was, and ``--resume --lr
SMALLER`` continues from it.
Under ``torchrun --nproc_per_node K`` the same command trains with DistributedDataParallel
(``--batch`` is per process; rank 0 writes).

Example (about 6 minutes on one CPU core):
    python -m models.train --dataset mvtec --root ../shared/data/mvtec_hazelnut_subset \\
        --model daad --size 64 --width 16 --division 2 2 1 --epochs 200 --eval-every 50 \\
        --out runs/hazelnut

High resolution (as anomalib's tiler): images at 256, a network of 128 trained on random crops,
scored by 9 overlapping tiles stitched into one 256 x 256 map:
    python -m models.train --dataset mvtec --root ../shared/data/mvtec_hazelnut_subset \\
        --model daad --size 256 --tile-size 128 --tile-stride 64 --width 16 --division 4 4 1 \\
        --out runs/hazelnut-tiled
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from typing import Optional, Sequence

from .cli import add_speed_option, command_parser
from .data import add_options, layout, option_fields
from .data.images import add_pixel_limit_option, set_pixel_limit
from .inference import RunScoring
from .networks import MODEL_NAMES, ModelConfig
from .networks.acceleration import FAST_INFERENCE, FAST_TRAINING, PLAIN
from .networks.losses import ALI_REDUCTIONS, REC_REDUCTIONS
from .networks.maps import ANOMALY_MAPS
from .training import (CHECKPOINT, DEFAULT_READING, LOSS_READINGS, CheckpointError, DivergenceError, Resume,
                       RunOptions, TrainConfig, Trainer, load_checkpoint, train)
from .training.amp import AMP_DTYPES
from .training.atomic import WriteError
from .training.checkpoint import stored_config
from .training.distributed import setup_distributed, teardown_distributed
from .training.log import summary_writer_class

MODEL_FIELDS = ("model", "size", "width", "division", "num_items", "backend")
#: Settings a resumed run may change (how long it trains, what it logs); the others come from the
#: checkpoint. ``lr``: to go on with a lower rate after a divergence.
RESUMABLE = ("root", "epochs", "steps", "until_plateau", "plateau_window", "plateau_tolerance", "plateau_min_steps",
             "workers",
             "eval_every", "eval_subset", "lr")
#: Flags of this invocation only: never stored, free on --resume.
INVOCATION = ("device", "out", "resume", "skip_bad_images", "max_pixels", "amp", "no_fast", "log",
              "checkpoint_minutes")


def build_parser() -> argparse.ArgumentParser:
    t, m = TrainConfig(), ModelConfig()
    # Unset flags stay unset (SUPPRESS): --resume can tell them apart.
    p = command_parser(__doc__, __package__, "train", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="the run's settings from a file (JSON, or YAML with PyYAML): "
                   "the keys of a run's config.json; flags given beside it override them")
    data = p.add_argument_group("data")
    data.add_argument("--root", help="data folder: an MVTec AD category, the MNIST/CIFAR root or an image folder")
    data.add_argument("--category", help="sub-folder of --root to use (an MVTec AD category)")
    add_options(data, default=t.dataset)
    data.add_argument("--skip-bad-images", action="store_true",
                      help="leave unreadable image files out with a warning (default: stop, listing them)")
    add_pixel_limit_option(data)
    net = p.add_argument_group("model")
    net.add_argument("--model", choices=MODEL_NAMES, help=f"variant; '+' adds the discriminator (default: {m.model})")
    net.add_argument("--size", type=int, help="image size the data is read and scored at, a multiple of "
                                              f"16*lcm(RH, RW) (default: {m.size})")
    net.add_argument("--tile-size", type=int, help="high resolution: the network takes tiles of this size (a "
                     "multiple of 16*lcm(RH, RW), at most --size), trains on random crops of the --size images "
                     "and scores them by tiles stitched into one map (default: none, whole images)")
    net.add_argument("--tile-stride", type=int, help="pixels between tiles when scoring, at most --tile-size "
                     "(overlaps averaged); --size minus --tile-size must be a multiple (default: --tile-size)")
    net.add_argument("--width", type=int, help=f"width multiplier, 64 in the paper (default: {m.width})")
    net.add_argument("--division", type=int, nargs=3, metavar=("RH", "RW", "RC"),
                     help=f"division rates of every memory (default: {' '.join(map(str, m.division))})")
    net.add_argument("--num-items", type=int, help=f"memory items N per memory (default: {m.num_items})")
    net.add_argument("--backend", help=f"daad_ext backend of every memory: auto, reference, cpu, cuda, ... (default: {m.backend})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"total epochs, also when resuming (default: {t.epochs})")
    opt.add_argument("--steps", type=int, help="total optimisation steps instead of --epochs (the run ends with the "
                                               "epoch that reaches them)")
    opt.add_argument("--val-ratio", type=float, help="share of the training images held out for validation, the "
                                                     f"same for every seed (default: {t.val_ratio})")
    opt.add_argument("--until-plateau", action="store_true",
                     help="stop early once the validation error has not improved by --plateau-tolerance over "
                          "--plateau-window epochs (needs --val-ratio)")
    opt.add_argument("--plateau-window", type=int, help=f"epochs (default: {t.plateau_window})")
    opt.add_argument("--plateau-tolerance", type=float, help=f"relative improvement (default: {t.plateau_tolerance})")
    opt.add_argument("--plateau-min-steps", type=int,
                     help="the plateau stops no run before this many steps: an error by SSIM may sit flat for "
                          f"the first hundreds (default: {t.plateau_min_steps})")
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
    opt.add_argument("--rec-loss", choices=REC_REDUCTIONS,
                     help="reading of L_rec (default: that of --losses); see models/networks/losses.py. DAAD+ by "
                          "ssim takes the weights of --losses ssim where none are given: the paper's do not train it")
    opt.add_argument("--ali-loss", choices=ALI_REDUCTIONS, help="reading of L_ali and of the score L(x) (default: that of --losses)")
    opt.add_argument("--anomaly-map", choices=ANOMALY_MAPS, help="pixel map the run is scored by: squared error or "
                                                                "SSIM's (default: l2); see models/networks/maps.py")
    opt.add_argument("--d-reset", type=float,
                     help="re-initialise the discriminator when its loss falls below this (0: never; default: that of --losses)")
    opt.add_argument("--entropy-weight", type=float, help="MemAE entropy loss weight (default: 0.0002 for memae, else 0)")
    opt.add_argument("--gamma", type=float, help="score fusion weight of R (default: 0.9 with a discriminator, else 1)")
    opt.add_argument("--seed", type=int, help=f"(default: {t.seed})")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, help=f"data loader processes (default: {t.workers})")
    run.add_argument("--eval-every", type=int, help="evaluate on the test split every N epochs (default: 0, never)")
    run.add_argument("--eval-subset", type=int, help="evaluate on a fixed subset of this many test images "
                                                     "(default: 0, all)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    run.add_argument("--amp", nargs="?", const="bf16", choices=AMP_DTYPES,
                     help="mixed precision: bf16 (CPU, CUDA; the default with a bare --amp) or fp16 "
                          "(CUDA, with gradient scaling); not stored, give it again with --resume")
    add_speed_option(run, FAST_TRAINING, "within float32 rounding; its test metrics and calibration as "
                                         "daad-predict computes them")
    run.add_argument("--log", choices=("tensorboard",), help="also log every epoch's numbers to TensorBoard "
                                                           "(OUT/tensorboard; needs the tensorboard package)")
    run.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    run.add_argument("--checkpoint-minutes", type=float, metavar="MINUTES",
                     help="write the checkpoint once this many minutes of training have passed since the "
                          "last, and after the last epoch (default: 0, after every epoch; a large model "
                          "trained in many short epochs can spend more time saving than training)")
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
    base = read_config(given.pop("config")) if "config" in given else None
    if base is None and "root" not in given:
        raise ValueError("--root is required (the data folder)")
    preset = LOSS_READINGS[given.pop("losses")] if "losses" in given else {}
    for key, value in preset.items():
        given.setdefault(key, value)
    model = {k: given.pop(k) for k in MODEL_FIELDS if k in given}
    data = {k: given.pop(k) for k in option_fields() if k in given}
    if base is None or "dataset" in given:
        model["in_channels"] = layout(given.get("dataset", TrainConfig.dataset)).channels
    if base is None:
        return TrainConfig(model=ModelConfig(**model), data=data, **given), None
    return replace(base, model=replace(base.model, **model), data={**base.data, **data}, **given), None


def read_config(path: str) -> TrainConfig:
    """A run's settings from a JSON or YAML file with the keys of its ``config.json``."""
    try:
        text = open(path).read()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the settings file {path}: {e.strerror}") from e
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"{path} is YAML: install PyYAML (pip install pyyaml), or give the settings as "
                             "JSON") from e
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from e
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings (the keys of a run's config.json)")
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def main(argv: Optional[Sequence[str]] = None) -> Trainer:
    """Runs the command line; returns the trainer (its ``model`` holds the trained networks)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    set_pixel_limit(getattr(args, "max_pixels", None))
    skip_bad_images = getattr(args, "skip_bad_images", False)
    try:  # bad flags, paths, sizes, images and checkpoints end here with a message naming them
        if getattr(args, "log", None) == "tensorboard":
            summary_writer_class()
        config, resume = make_config(args)
        fast = not getattr(args, "no_fast", False)
        options = RunOptions(amp=getattr(args, "amp", None), speed=FAST_TRAINING if fast else PLAIN,
                             tensorboard=getattr(args, "log", None) == "tensorboard", program=parser.prog,
                             checkpoint_minutes=getattr(args, "checkpoint_minutes", 0.0))
        train_set = config.dataset_split("train", augment=True, skip_bad_images=skip_bad_images)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    ctx = setup_distributed(args.device)
    try:
        hooks = RunScoring(config, train_set, ctx.device, skip_bad_images, FAST_INFERENCE if fast else PLAIN)
        return train(config, args.out, ctx, train_set, hooks, resume, options)
    except (DivergenceError, CheckpointError, WriteError) as e:  # a resumed checkpoint's weights, a full disk
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main()
