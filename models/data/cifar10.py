"""The one-class CIFAR-10 layout (``--dataset cifar10``), one class normal, 3 channels: torchvision's
CIFAR-10 under ``root/cifar-10-batches-py`` (never downloaded) or, as CIFAR-10 is often shipped, a
class-folder tree of image files (torchvision's ``ImageFolder`` layout: ``root/train/<class>/*``,
``root/test/<class>/*``; classes numbered in sorted order, as ``ImageFolder`` numbers them)."""
from __future__ import annotations

from pathlib import Path

from .dataset import OneClassDataset, OneClassOptions, file_dataset, one_class_dataset, torchvision_arrays
from .images import list_images
from .registry import Layout, register


def class_folders(root: Path, split: str) -> list[Path]:
    """The class folders of ``root/<split>`` in ImageFolder's order, or [] where there is no tree."""
    folder = root / split
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_tree_dataset(root: Path, split: str, size: int, normal_class: int, augment: bool,
                       skip_bad_images: bool) -> OneClassDataset:
    """The one-class protocol on a class-folder tree: the training split keeps the normal class."""
    classes = class_folders(root, split)
    if normal_class >= len(classes):
        raise ValueError(f"normal_class {normal_class} is not a class of {root / split}: it has {len(classes)} "
                         f"class folders ({', '.join(p.name for p in classes)})")
    chosen = [classes[normal_class]] if split == "train" else classes
    files = [(path, int(folder != classes[normal_class])) for folder in chosen for path in list_images(folder)]
    return file_dataset([p for p, _ in files], [label for _, label in files], size, augment, skip_bad_images)


def cifar10_dataset(root: Path, split: str, size: int, options: OneClassOptions, augment: bool,
                    skip_bad_images: bool) -> OneClassDataset:
    if not (root / "cifar-10-batches-py").is_dir() and class_folders(root, split):
        return class_tree_dataset(root, split, size, options.normal_class, augment, skip_bad_images)
    import torchvision
    images, classes = torchvision_arrays("cifar10", torchvision.datasets.CIFAR10, root, split,
                                         root / "cifar-10-batches-py",
                                         f" or a class-folder tree ({root}/train/<class>/*, {root}/test/<class>/*)")
    return one_class_dataset("cifar10", split, images, classes, size, options.normal_class, augment)


register(Layout("cifar10", channels=3, options=OneClassOptions, build=cifar10_dataset,
                summary="CIFAR-10: torchvision's root/cifar-10-batches-py, or root/{train,test}/<class>/*"))
