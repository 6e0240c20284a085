"""The image-folder layout (``--dataset folder``), in one of two forms:

* by layout: ``root/train/*`` normal images; ``root/test/normal/*`` and ``root/test/anomalous/*``;
* by its folders (``--normal-dir``, as anomalib's ``Folder``): a folder of normal images, folders
  of abnormal ones (``--abnormal-dirs``) and, optionally, a folder of masks (``--mask-dir``; else
  masks lie beside their images), all below ``root``. A mask is matched to its image by file stem
  (``NAME.png`` or ``NAME_mask.png`` for ``NAME.jpg``; a file that is the mask of another is not an
  image). The normal images are split into train and test by a fixed seeded permutation
  (:data:`SPLIT_SEED`, the same for every run) at ``--train-ratio``, or, given a folder of normal
  test images (``--normal-test-dir``, anomalib's ``normal_test_dir``), all of them train and that
  folder's images are the normal test images; the test split adds every abnormal image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .dataset import OneClassDataset, file_dataset
from .images import list_images
from .registry import Layout, option, register

#: Seed of the permutation that splits a folder data set's normal images into train and test.
SPLIT_SEED = 0


@dataclass(frozen=True)
class FolderOptions:
    normal_dir: Optional[str] = option(None, "folder of normal images below --root (the data set given by "
                                             "its folders; else root/train and root/test/{normal,anomalous})",
                                       type=str)
    abnormal_dirs: tuple[str, ...] = option((), "folders of abnormal images below --root", type=str, nargs="+")
    mask_dir: Optional[str] = option(None, "folder of masks below --root (default: beside the images)", type=str)
    normal_test_dir: Optional[str] = option(None, "folder of normal test images below --root (then every image of "
                                                  "--normal-dir trains)", type=str)
    train_ratio: float = option(0.8, "share of the normal images used for training (without --normal-test-dir)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "abnormal_dirs", tuple(self.abnormal_dirs))
        if not 0 < self.train_ratio < 1:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.train_ratio}")
        if self.normal_dir is None and (self.abnormal_dirs or self.mask_dir or self.normal_test_dir):
            raise ValueError("--abnormal-dirs, --mask-dir and --normal-test-dir describe a folder data set given "
                             "by its folders: give --normal-dir too")


def layout_dataset(root: Path, split: str, size: int, augment: bool, skip_bad_images: bool) -> OneClassDataset:
    """The train/test layout."""
    if split == "train":
        files = [(p, 0) for p in list_images(root / "train")]
    else:
        files = [(p, label) for label, kind in enumerate(("normal", "anomalous"))
                 for p in list_images(root / "test" / kind)]
    return file_dataset([p for p, _ in files], [label for _, label in files], size, augment, skip_bad_images)


def images_and_masks(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """The images of ``folder`` and the masks beside them by image stem: ``NAME_mask.*`` is the
    mask of ``NAME``, and so is ``NAME.png`` where ``NAME`` has an image of another extension."""
    files = list_images(folder)
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    masks = {}
    for path in files:
        if path.stem.endswith("_mask") and path.stem[:-5] in by_stem:
            masks[path.stem[:-5]] = path
        elif path.suffix.lower() == ".png" and len(by_stem[path.stem]) > 1:
            masks[path.stem] = path
    taken = set(masks.values())
    images = [p for p in files if p not in taken]
    if not images:
        raise FileNotFoundError(f"{folder} holds only masks, no image")
    return images, masks


def mask_folder(folder: Path) -> dict[str, Path]:
    """The masks of a mask folder by the stem of their image (``NAME.*`` or ``NAME_mask.*``)."""
    masks = {}
    for path in list_images(folder):
        stem = path.stem[:-5] if path.stem.endswith("_mask") else path.stem
        masks.setdefault(stem, path)
    return masks


def split_normal(files: Sequence[Path], train_ratio: float) -> tuple[list[Path], list[Path]]:
    """Train and test share of the normal images: a permutation fixed by :data:`SPLIT_SEED`."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    cut = int(round(train_ratio * len(files)))
    if not 0 < cut < len(files):
        raise ValueError(f"train_ratio {train_ratio} leaves no normal image for train or for test "
                         f"({len(files)} normal images)")
    return [files[i] for i in sorted(order[:cut])], [files[i] for i in sorted(order[cut:])]


def folders_dataset(root: Path, options: FolderOptions, split: str, size: int, augment: bool,
                    skip_bad_images: bool) -> OneClassDataset:
    """The data set given by its folders."""
    normal, _ = images_and_masks(root / options.normal_dir)
    if options.normal_test_dir is None:
        train, test = split_normal(normal, options.train_ratio)
    else:
        train, test = normal, images_and_masks(root / options.normal_test_dir)[0]
    if split == "train":
        return file_dataset(train, [0] * len(train), size, augment, skip_bad_images)
    separate = mask_folder(root / options.mask_dir) if options.mask_dir else None
    files, masks = list(test), [None] * len(test)  # a normal image's mask is known: all zeros
    for folder in options.abnormal_dirs:
        images, beside = images_and_masks(root / folder)
        found = separate if separate is not None else beside
        files += images
        masks += [str(found[p.stem]) if p.stem in found else None for p in images]
    labels = [0] * len(test) + [1] * (len(files) - len(test))
    return file_dataset(files, labels, size, augment, skip_bad_images,
                        masks if options.abnormal_dirs else None)


def folder_dataset(root: Path, split: str, size: int, options: FolderOptions, augment: bool,
                   skip_bad_images: bool) -> OneClassDataset:
    if options.normal_dir is None:
        return layout_dataset(root, split, size, augment, skip_bad_images)
    return folders_dataset(root, options, split, size, augment, skip_bad_images)


register(Layout("folder", channels=3, options=FolderOptions, build=folder_dataset,
                summary="image folders: root/train, root/test/{normal,anomalous}, or --normal-dir and "
                        "--abnormal-dirs"))
