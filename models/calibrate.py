"""Calibrate a checkpoint again: ``python -m models.calibrate --checkpoint CK --normal-dir DIR``.

Training ends by calibrating the scores on held-out normal images (its validation split, else
its training images): the ranges that scale R and L, and the image and pixel thresholds that
daad-evaluate, daad-predict, models.Detector and the exported graph all normalise to 0.5
(models/inference/calibration.py). This command measures that calibration again on a folder of
normal images the model has not seen (the image threshold: a high quantile of their scores), or,
given --abnormal-dir too, on normal and abnormal images (the threshold of the best F1; the pixel
threshold from --mask-dir's masks, matched by stem, NAME.png or NAME_mask.png). The checkpoint is
rewritten atomically; the calibrations it replaces stay in it (previous_calibrations) and --undo
restores the last of them.

Example:
    python -m models.calibrate --checkpoint runs/hazelnut/checkpoint.pt --normal-dir held_out/good \\
        --abnormal-dir held_out/crack --mask-dir held_out/masks
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from .cli import add_speed_option, command_parser, program
from .data import OneClassDataset, build_dataset
from .data.images import add_pixel_limit_option, set_pixel_limit
from .inference import Scorer, collect_scores
from .inference.calibration import calibrate
from .networks.acceleration import FAST_INFERENCE, PLAIN, inference_model
from .training import load_checkpoint, load_detector, save_checkpoint
from .training.distributed import resolve_device

#: The checkpoint's list of the calibrations replaced, the last replaced last.
PREVIOUS = "previous_calibrations"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__doc__, __package__, "calibrate")
    p.add_argument("--checkpoint", required=True, help=f"checkpoint.pt written by {program(__package__, 'train')}")
    p.add_argument("--normal-dir", help="folder of normal images the model was not trained on")
    p.add_argument("--abnormal-dir", help="folder of abnormal images (the threshold of the best F1)")
    p.add_argument("--mask-dir", help="folder of the abnormal images' masks (default: beside them)")
    p.add_argument("--undo", action="store_true", help="restore the calibration the last one replaced")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable image files out with a warning (default: stop, listing them)")
    add_pixel_limit_option(p)
    p.add_argument("--batch", type=int, default=16, help="images scored at a time (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: auto)")
    add_speed_option(p, FAST_INFERENCE, "as daad-predict")
    return p


def calibration_set(normal_dir: str, abnormal_dir: Optional[str], mask_dir: Optional[str], size: int,
                    skip_bad_images: bool = False) -> OneClassDataset:
    """Every image of ``normal_dir`` (label 0) and of ``abnormal_dir`` (label 1, masks from
    ``mask_dir`` or beside them), read as the folder layout reads them."""
    return build_dataset("folder", ".", "test", size, skip_bad_images=skip_bad_images, normal_dir=normal_dir,
                         normal_test_dir=normal_dir, abnormal_dirs=(abnormal_dir,) if abnormal_dir else (),
                         mask_dir=mask_dir)


def measure(checkpoint: str, normal_dir: str, abnormal_dir: Optional[str] = None, mask_dir: Optional[str] = None,
            device: str = "auto", batch: int = 16, fast: bool = True,
            skip_bad_images: bool = False) -> dict[str, float]:
    """The calibration of a checkpoint's detector on the images of the folders."""
    if mask_dir and not abnormal_dir:
        raise ValueError("--mask-dir holds the masks of --abnormal-dir's images: give --abnormal-dir too")
    dev = resolve_device(device)
    model, config, _ = load_detector(checkpoint, dev)
    if config.model.in_channels != 3:
        raise ValueError(f"image folders are read in colour; {checkpoint} takes {config.model.in_channels} channel(s)")
    images = calibration_set(normal_dir, abnormal_dir, mask_dir, config.model.size, skip_bad_images)
    speed = FAST_INFERENCE if fast else PLAIN
    scorer = Scorer.for_run(config)
    return calibrate(scorer, collect_scores(inference_model(model, speed), images, dev, scorer, batch, speed))


def replace_calibration(checkpoint: str, calibration: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Rewrites the checkpoint atomically with ``calibration``, keeping the one it replaces in
    ``previous_calibrations``; without one, restores the last of those. Returns the new one."""
    state = load_checkpoint(checkpoint)
    previous = list(state.get(PREVIOUS) or [])
    if calibration is None:
        if not previous:
            raise ValueError(f"{checkpoint} keeps no previous calibration to restore")
        calibration = previous.pop()
    elif state.get("calibration") is not None:
        previous.append(state["calibration"])
    state["calibration"], state[PREVIOUS] = calibration, previous
    save_checkpoint(state, checkpoint)
    return calibration


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_pixel_limit(getattr(args, "max_pixels", None))
    if args.undo == bool(args.normal_dir):
        parser.error("give --normal-dir (to calibrate) or --undo (to restore the previous calibration)")
    try:
        calibration = None if args.undo else measure(args.checkpoint, args.normal_dir, args.abnormal_dir,
                                                     args.mask_dir, args.device, args.batch, not args.no_fast,
                                                     args.skip_bad_images)
        calibration = replace_calibration(args.checkpoint, calibration)
    except (ValueError, OSError) as e:  # OSError: missing folders, a checkpoint that cannot be written
        parser.error(str(e))
    print(json.dumps(calibration))
    return calibration


if __name__ == "__main__":
    main()
