"""The MVTec AD layout (``--dataset mvtec``): ``root/train/good/*``, ``root/test/<good or defect
type>/*``, ``root/ground_truth/<defect type>/<stem>_mask.png`` (MVTec's naming) or ``<stem>.png``.
Grayscale categories are converted to 3 channels. ``--category`` picks a category of a full
MVTec AD root."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .dataset import OneClassDataset, file_dataset
from .images import list_images
from .registry import Layout, register


@dataclass(frozen=True)
class MVTecOptions:
    """MVTec AD takes no options of its own."""


def _mvtec_mask(root: Path, defect: str, image: Path) -> Optional[str]:
    for suffix in ("_mask", ""):
        path = root / "ground_truth" / defect / f"{image.stem}{suffix}.png"
        if path.is_file():
            return str(path)
    return None


def mvtec_dataset(root: Path, split: str, size: int, options: MVTecOptions, augment: bool,
                  skip_bad_images: bool) -> OneClassDataset:
    if not (root / "train" / "good").is_dir():
        raise FileNotFoundError(
            f"{root} is not an MVTec AD category folder: {root / 'train' / 'good'} not found (expected "
            "train/good, test/<good or defect type>, ground_truth/<defect type>)")
    if split == "train":
        files = list_images(root / "train" / "good")
        return file_dataset(files, [0] * len(files), size, augment, skip_bad_images)
    test = root / "test"
    kinds = sorted(p.name for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if test.is_dir() else []
    if not kinds:
        raise FileNotFoundError(f"no test/<good or defect type> folders under {root}")
    files, labels, masks = [], [], []
    for kind in kinds:
        for path in list_images(test / kind):
            files.append(path)
            labels.append(int(kind != "good"))
            masks.append(None if kind == "good" else _mvtec_mask(root, kind, path))
    return file_dataset(files, labels, size, augment, skip_bad_images, masks)


register(Layout("mvtec", channels=3, options=MVTecOptions, build=mvtec_dataset,
                summary="an MVTec AD category: train/good, test/<good or defect type>, ground_truth/<defect type>"))
