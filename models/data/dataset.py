"""The shared data set class and image/mask loading of every layout.

Every data set yields dicts ``{"image": (C, S, S) in [-1, 1], "label": 0 normal / 1 anomalous,
"mask": (1, S, S) in {0, 1}, "mask_known": bool, "index": i}``; ``dataset.names[i]`` names item
i, and ``dataset.has_masks`` says whether the masks are ground truth (else all zeros).

Image files are all decoded once when a data set is built (:func:`file_dataset`), before any
training (see :mod:`models.data.images` for the formats read and the files ignored):

* unreadable images and masks raise one :class:`~models.data.images.BadImageError` listing every
  one with its reason; with ``skip_bad_images`` they are left out with a :class:`DataWarning` (an
  unreadable mask leaves its image in, as an image without a mask);
* a mask must be the image at some scale (a different aspect ratio is unreadable: it belongs
  to another image); a scaled one is resized with the image;
* a defective test image without a mask gets a :class:`DataWarning` naming it; it counts for the
  image AUROC and is left out of the pixel AUROC (``item["mask_known"]`` is False).

Array data sets (MNIST, CIFAR-10) follow the one-class protocol (:func:`one_class_dataset`).
The real data's folder is :func:`data_root`: ``$DAAD_DATA_ROOT``, else ``../shared/data`` beside
the checkout.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import BadImageError, decoded_size, read_mask, read_pixels, scaled_copy
from .preprocess import to_model_input
from .registry import option

#: Environment variable naming the folder that holds the real data sets.
DATA_ROOT_ENV = "DAAD_DATA_ROOT"


class DataWarning(UserWarning):
    """Files of a data set left out or only partly used (see the module docstring)."""


def data_root() -> Path:
    """The folder of the real data sets: ``$DAAD_DATA_ROOT``, else ``<checkout>/../shared/data``."""
    override = os.environ.get(DATA_ROOT_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "data"


def prepare(image: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 (C, H, W) -> float (C, size, size); images to [-1, 1] (:func:`~models.data.preprocess.to_model_input`),
    masks (mode "nearest-exact") to {0, 1}."""
    if mode == "bilinear":
        return to_model_input(image[None], size)[0]
    return (F.interpolate(image.float()[None], size=(size, size), mode=mode)[0] > 127).float()


def as_chw(array: np.ndarray) -> torch.Tensor:
    """uint8 pixels (H, W) or (H, W, C) as a (C, H, W) tensor (a copy)."""
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy of PIL's buffer


def load_image(path: str, channels: int, size: int) -> torch.Tensor:
    """An image file as a (channels, size, size) tensor in [-1, 1]."""
    return prepare(as_chw(read_pixels(path, channels)), size)


def load_mask(path: str, size: int) -> torch.Tensor:
    """A mask file (any encoding: :func:`~models.data.images.mask_region`) as (1, size, size) in {0, 1}."""
    return prepare(as_chw(read_mask(path).astype(np.uint8) * 255), size, mode="nearest-exact")


class OneClassDataset(Dataset):
    """Images (from files or from a uint8 array), their labels and optional mask files.

    ``mask_known[i]`` says whether item i's mask is ground truth: a mask file, or all zeros for a
    normal image of a data set with masks. Items without one are left out of the pixel AUROC.
    ``crop`` (with ``augment``): each flipped image and its mask cut to a random ``crop`` x ``crop``
    window, the tiles a tiled detector trains on (:meth:`with_crops`).
    """

    def __init__(self, names: Sequence[str], labels: Sequence[int], channels: int, size: int,
                 mask_paths: Optional[Sequence[Optional[str]]] = None,
                 arrays: Optional[torch.Tensor] = None, augment: bool = False,
                 mask_known: Optional[Sequence[bool]] = None, crop: Optional[int] = None) -> None:
        if crop is not None and not 1 <= crop <= size:
            raise ValueError(f"the crop size {crop} must be between 1 and the image size {size}")
        self.names, self.labels = list(names), [int(v) for v in labels]
        self.channels, self.size, self.augment, self.crop = channels, size, augment, crop
        self.mask_paths = list(mask_paths) if mask_paths is not None else [None] * len(self.names)
        #: uint8 (N, C, H, W) for array datasets; None when ``names`` are image files.
        self.arrays = arrays
        self.has_masks = any(p is not None for p in self.mask_paths)
        self.mask_known = (list(mask_known) if mask_known is not None
                           else [p is not None for p in self.mask_paths])
        #: Decoded, resized items by index: each file is decoded once per process, not every epoch.
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _view(self, augment: bool, crop: Optional[int]) -> "OneClassDataset":
        """The same items augmented otherwise; they share the decoded images."""
        view = OneClassDataset(self.names, self.labels, self.channels, self.size, self.mask_paths,
                               self.arrays, augment, self.mask_known, crop)
        view._cache = self._cache
        return view

    def without_augmentation(self) -> "OneClassDataset":
        """The same items, whole and not flipped (to score the training images): no file is read again."""
        return self._view(False, None)

    def with_crops(self, crop: int) -> "OneClassDataset":
        """The same items, flipped and then cut to a random ``crop`` x ``crop`` window (the mask
        with its image); no file is read again."""
        return self._view(True, crop)

    def subset(self, indices: Sequence[int]) -> "OneClassDataset":
        """The items at ``indices``, in that order, augmented as this set is; the images decoded so
        far are not decoded again."""
        indices = [int(i) for i in indices]
        part = OneClassDataset([self.names[i] for i in indices], [self.labels[i] for i in indices],
                               self.channels, self.size, [self.mask_paths[i] for i in indices],
                               None if self.arrays is None else self.arrays[indices], self.augment,
                               [self.mask_known[i] for i in indices], self.crop)
        part._cache = {new: self._cache[old] for new, old in enumerate(indices) if old in self._cache}
        return part

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self._cache:
            return self._cache[index]
        if self.arrays is None:
            image = load_image(self.names[index], self.channels, self.size)
        else:
            image = prepare(self.arrays[index], self.size)
        mask_path = self.mask_paths[index]
        mask = load_mask(mask_path, self.size) if mask_path else torch.zeros(1, self.size, self.size)
        if self.arrays is None:  # array data sets are already in memory
            self._cache[index] = image, mask
        return image, mask

    def __getitem__(self, index: int) -> dict:
        image, mask = self._load(index)
        if self.augment:
            # Random horizontal and vertical flips (the paper's augmentation), from torch's RNG
            # so that the run's seed fixes them.
            for dim in (-1, -2):
                if torch.rand(()) < 0.5:
                    image, mask = image.flip(dim), mask.flip(dim)
            if self.crop is not None:  # after the flips, from the same RNG
                top, left = torch.randint(0, self.size - self.crop + 1, (2,)).tolist()
                window = (slice(None), slice(top, top + self.crop), slice(left, left + self.crop))
                image, mask = image[window], mask[window]
        return {"image": image, "label": self.labels[index], "mask": mask,
                "mask_known": self.mask_known[index], "index": index}



def file_dataset(images: Sequence[Path], labels: Sequence[int], size: int, augment: bool,
                 skip_bad_images: bool, masks: Optional[Sequence[Optional[str]]] = None) -> OneClassDataset:
    """A dataset of image files after decoding every image and mask once (see the module docstring).

    ``masks`` (data sets with ground truth): each image's mask file, or None; the mask of a normal
    image is known without a file (all zeros), that of a defective one only from its file.
    """
    has_masks = masks is not None
    masks = list(masks) if has_masks else [None] * len(images)
    problems, keep = [], []
    for i, path in enumerate(images):
        try:
            size_of_image = decoded_size(path)
        except BadImageError as e:
            problems += e.problems
            continue
        keep.append(i)
        if masks[i] is None:
            continue
        try:
            size_of_mask = decoded_size(masks[i])
            if not scaled_copy(size_of_mask, size_of_image):
                raise BadImageError([(masks[i], f"mask of {size_of_mask[0]}x{size_of_mask[1]} does not fit "
                                                f"its image {path.name} of {size_of_image[0]}x{size_of_image[1]} "
                                                "at any scale")])
        except BadImageError as e:
            problems += e.problems
            masks[i] = None
    if problems:
        if not skip_bad_images:
            raise BadImageError(problems, "fix or remove them, or pass --skip-bad-images to leave them out")
        if not keep:
            raise BadImageError(problems, "no readable image is left")
        warnings.warn(str(BadImageError(problems, "left out (--skip-bad-images); an image whose mask "
                                                  "is unreadable is kept without its mask")), DataWarning)
    unmasked = [str(images[i]) for i in keep if has_masks and labels[i] and masks[i] is None]
    if unmasked:
        warnings.warn(f"{len(unmasked)} defective image(s) without a readable ground-truth mask: "
                      f"{', '.join(unmasked)}; they count for the image AUROC and are left out of the "
                      "pixel AUROC", DataWarning)
    return OneClassDataset([str(images[i]) for i in keep], [labels[i] for i in keep], 3, size,
                           mask_paths=[masks[i] for i in keep], augment=augment,
                           mask_known=[has_masks and (not labels[i] or masks[i] is not None) for i in keep])


@dataclass(frozen=True)
class OneClassOptions:
    """The settings of a labelled data set used one class at a time (MNIST, CIFAR-10)."""

    normal_class: int = option(0, "the class that is normal, 0..9")

    def __post_init__(self) -> None:
        if not 0 <= self.normal_class <= 9:
            raise ValueError(f"normal_class must be a class index 0..9, got {self.normal_class}")


def one_class_dataset(name: str, split: str, images: torch.Tensor, classes: torch.Tensor, size: int,
                      normal_class: int, augment: bool, first_index: int = 0) -> OneClassDataset:
    """The one-class protocol on a labelled image array (uint8 (N, C, H, W)): the training split
    keeps only ``normal_class``; in the test split it is label 0 and every other class label 1.
    Items are named ``<name>-<split>-<index>``, counting from ``first_index``."""
    if split == "train":
        keep = (classes == normal_class).nonzero().flatten()
        images, classes = images[keep], classes[keep]
    labels = (classes != normal_class).long()
    names = [f"{name}-{split}-{first_index + int(i)}" for i in
             (keep if split == "train" else torch.arange(len(labels)))]
    return OneClassDataset(names, labels.tolist(), images.shape[1], size, arrays=images, augment=augment)


def torchvision_arrays(name: str, dataset_class: type, root: Path, split: str, expected: Path,
                       hint: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 (N, C, H, W)) and classes of a torchvision data set already on disk under
    ``root`` (never downloaded); a clear error naming the layout and ``expected`` where it is absent."""
    try:
        data = dataset_class(str(root), train=split == "train", download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{name} not found under {root}: torchvision expects its files in "
            f"{expected}{hint}; nothing is downloaded") from e
    images = torch.as_tensor(np.asarray(data.data))
    # MNIST gives (N, H, W), CIFAR-10 (N, H, W, C); both become (N, C, H, W).
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(data.targets), dtype=torch.int64)
