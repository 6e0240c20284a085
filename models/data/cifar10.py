"""The one-class CIFAR-10 layout (``--dataset cifar10``): torchvision's CIFAR-10 under
``root/cifar-10-batches-py`` (never downloaded), one class normal, 3 channels."""
from __future__ import annotations

from pathlib import Path

from .dataset import OneClassDataset, OneClassOptions, one_class_dataset, torchvision_arrays
from .registry import Layout, register


def cifar10_dataset(root: Path, split: str, size: int, options: OneClassOptions, augment: bool,
                    skip_bad_images: bool) -> OneClassDataset:
    import torchvision
    images, classes = torchvision_arrays("cifar10", torchvision.datasets.CIFAR10, root, split, root / "cifar-10-batches-py")
    return one_class_dataset("cifar10", split, images, classes, size, options.normal_class, augment)


register(Layout("cifar10", channels=3, options=OneClassOptions, build=cifar10_dataset,
                summary="CIFAR-10: torchvision's root/cifar-10-batches-py"))
