"""Data sets: one module per layout (:mod:`.mvtec`, :mod:`.folder`, :mod:`.mnist`, :mod:`.cifar10`),
each registering itself (:mod:`.registry`); the shared data set class and mask handling
(:mod:`.dataset`) and image files (:mod:`.images`) beside them.

Example:
    >>> from models.data import build_dataset, data_root
    >>> test = build_dataset("mvtec", str(data_root() / "mvtec_hazelnut_subset"), "test", size=64)  # doctest: +SKIP
    >>> item = test[0]; item["image"].shape, item["mask"].shape, test.has_masks  # doctest: +SKIP
    (torch.Size([3, 64, 64]), torch.Size([1, 64, 64]), True)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from . import mvtec, folder, mnist, cifar10  # noqa: F401, I001  (each registers its layout, in this order)
from .dataset import DATA_ROOT_ENV, DataWarning, OneClassDataset, data_root, load_image, load_mask
from .images import BadImageError
from .registry import LAYOUTS, Layout, add_options, layout, option, option_fields, register


def build_dataset(name: str, root: str, split: str, size: int, augment: bool = False,
                  skip_bad_images: bool = False, category: Optional[str] = None,
                  **options: Any) -> OneClassDataset:
    """The ``split`` ("train" or "test") of the data set of layout ``name`` under ``root``, resized
    to ``size``. ``category`` selects a sub-folder of ``root`` (an MVTec AD category of a full
    MVTec root); ``skip_bad_images`` leaves unreadable image files out with a warning instead of
    raising; ``options`` are the layout's own (e.g. ``normal_class`` of MNIST)."""
    entry = layout(name)
    settings = entry.options(**entry.parse(options))
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(os.path.expanduser(root)) / (category or "")
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root not found: {path}")
    dataset = entry.build(path, split, size, settings, augment, skip_bad_images)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {name} under {path} is empty")
    return dataset


__all__ = ["DATA_ROOT_ENV", "LAYOUTS", "BadImageError", "DataWarning", "Layout", "OneClassDataset", "add_options",
           "build_dataset", "data_root", "layout", "load_image", "load_mask", "option", "option_fields", "register"]
