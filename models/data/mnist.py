"""The one-class MNIST layout (``--dataset mnist``), 1 channel, one digit normal.

If ``root`` holds ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]`` themselves,
the IDX test set is split by index: images 0..4999 are the training pool (only the normal digit is
kept), images 5000..9999 the test set (the normal digit is label 0, the other nine label 1).
Otherwise torchvision's MNIST under ``root/MNIST/raw`` with its own train/test split (never
downloaded).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dataset import OneClassDataset, OneClassOptions, one_class_dataset, torchvision_arrays
from .registry import Layout, register

#: First test-set index of the MNIST IDX index split (see the module docstring).
MNIST_IDX_SPLIT = 5000


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes, as MNIST ships them."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _mnist_idx_arrays(root: Path, split: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    images_path = _find_idx(root, "t10k-images-idx3-ubyte")
    labels_path = _find_idx(root, "t10k-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        return None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
    part = slice(0, MNIST_IDX_SPLIT) if split == "train" else slice(MNIST_IDX_SPLIT, None)
    return torch.from_numpy(images[part].copy())[:, None], torch.from_numpy(labels[part].astype(np.int64))


def mnist_dataset(root: Path, split: str, size: int, options: OneClassOptions, augment: bool,
                  skip_bad_images: bool) -> OneClassDataset:
    arrays = _mnist_idx_arrays(root, split)
    if arrays is not None:
        first = MNIST_IDX_SPLIT if split == "test" else 0
        return one_class_dataset("mnist", split, *arrays, size, options.normal_class, augment, first)
    import torchvision
    images, classes = torchvision_arrays(
        "mnist", torchvision.datasets.MNIST, root, split, root / "MNIST" / "raw",
        " or the IDX files t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in the root itself")
    return one_class_dataset("mnist", split, images, classes, size, options.normal_class, augment)


register(Layout("mnist", channels=1, options=OneClassOptions, build=mnist_dataset,
                summary="MNIST: the t10k IDX files in the root (index split), or torchvision's root/MNIST/raw"))
