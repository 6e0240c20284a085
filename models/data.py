"""Datasets: MVTec AD categories, one-class MNIST / CIFAR-10, and generic image folders.

Every dataset yields dicts ``{"image": (C, S, S) in [-1, 1], "label": 0 normal / 1 anomalous,
"mask": (1, S, S) in {0, 1}, "index": i}``; ``dataset.names[i]`` names item i, and
``dataset.has_masks`` says whether the masks are ground truth (else all zeros).

Layouts (``root`` is the folder given by ``--root``):

* ``mvtec``: ``root/train/good/*``, ``root/test/<good or defect type>/*``,
  ``root/ground_truth/<defect type>/<stem>_mask.png`` (MVTec's naming) or ``<stem>.png``.
  Grayscale categories are converted to 3 channels.
* ``mnist``: if ``root`` holds ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``
  themselves, the IDX test set is split by index: images 0..4999 are the training pool (only the
  normal digit is kept), images 5000..9999 the test set (the normal digit is label 0, the other
  nine label 1). Otherwise torchvision's MNIST under ``root/MNIST/raw`` with its own train/test
  split (never downloaded). 1 channel.
* ``cifar10``: torchvision's CIFAR-10 under ``root/cifar-10-batches-py`` (never downloaded),
  one class normal, the same one-class protocol. 3 channels.
* ``folder``: ``root/train/*`` normal images; ``root/test/normal/*`` and ``root/test/anomalous/*``.
  Or, given by its folders (:class:`FolderSpec`, as anomalib's ``Folder``): a folder of normal
  images, folders of abnormal ones and, optionally, a folder of masks (else masks lie beside
  their images), all below ``root``; a mask is matched to its image by file stem (``NAME.png``
  or ``NAME_mask.png`` for ``NAME.jpg``; a file that is the mask of another is not an image).
  The normal images are split into train and test by a fixed seeded permutation
  (:data:`SPLIT_SEED`, the same for every run) at ``train_ratio``; the test split adds every
  abnormal image.

Image files (``mvtec``, ``folder``) are all decoded once when the data set is built, before any
training (see :mod:`models.images` for the formats read and the files ignored):

* unreadable images and masks raise one :class:`~models.images.BadImageError` listing every one
  with its reason; with ``skip_bad_images`` they are left out with a :class:`DataWarning` (an
  unreadable mask leaves its image in, as an image without a mask);
* a mask must be the image at some scale (a different aspect ratio is unreadable: it belongs
  to another image); a scaled one is resized with the image;
* a defective test image without a mask gets a :class:`DataWarning` naming it; it counts for the
  image AUROC and is left out of the pixel AUROC (``item["mask_known"]`` is False).

The real data's folder is :func:`data_root`: ``$DAAD_DATA_ROOT``, else ``../shared/data`` beside
the checkout.

Example:
    >>> from models.data import build_dataset, data_root
    >>> test = build_dataset("mvtec", str(data_root() / "mvtec_hazelnut_subset"), "test", size=64)  # doctest: +SKIP
    >>> item = test[0]; item["image"].shape, item["mask"].shape, test.has_masks  # doctest: +SKIP
    (torch.Size([3, 64, 64]), torch.Size([1, 64, 64]), True)
"""
from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .images import BadImageError, decoded_size, list_images, read_pixels, scaled_copy

if TYPE_CHECKING:
    from .config import TrainConfig

DATASETS = ("mvtec", "mnist", "cifar10", "folder")
#: First test-set index of the MNIST IDX index split (see the module docstring).
MNIST_IDX_SPLIT = 5000
CHANNELS = {"mvtec": 3, "mnist": 1, "cifar10": 3, "folder": 3}
#: Environment variable naming the folder that holds the real data sets.
DATA_ROOT_ENV = "DAAD_DATA_ROOT"
#: Seed of the permutation that splits a folder data set's normal images into train and test.
SPLIT_SEED = 0


@dataclass(frozen=True)
class FolderSpec:
    """A ``folder`` data set by its folders, relative to the root (see the module docstring)."""

    normal_dir: str
    abnormal_dirs: tuple[str, ...] = ()
    mask_dir: Optional[str] = None
    train_ratio: float = 0.8


class DataWarning(UserWarning):
    """Files of a data set left out or only partly used (see the module docstring)."""


def data_root() -> Path:
    """The folder of the real data sets: ``$DAAD_DATA_ROOT``, else ``<checkout>/../shared/data``."""
    override = os.environ.get(DATA_ROOT_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset_channels(name: str) -> int:
    check_dataset_name(name)
    return CHANNELS[name]


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def prepare(image: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 (C, H, W) -> float (C, size, size); images to [-1, 1], masks (mode "nearest-exact") to {0, 1}."""
    x = image.float().unsqueeze(0)
    if mode == "bilinear":
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x[0] / 127.5 - 1.0).clamp(-1.0, 1.0)
    return (F.interpolate(x, size=(size, size), mode=mode)[0] > 127).float()


def _as_chw(array: np.ndarray) -> torch.Tensor:
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy of PIL's buffer


def load_image(path: str, channels: int, size: int) -> torch.Tensor:
    """An image file as a (channels, size, size) tensor in [-1, 1]."""
    return prepare(_as_chw(read_pixels(path, channels)), size)


def load_mask(path: str, size: int) -> torch.Tensor:
    return prepare(_as_chw(read_pixels(path, 1)), size, mode="nearest-exact")


class OneClassDataset(Dataset):
    """Images (from files or from a uint8 array), their labels and optional mask files.

    ``mask_known[i]`` says whether item i's mask is ground truth: a mask file, or all zeros for a
    normal image of a data set with masks. Items without one are left out of the pixel AUROC.
    """

    def __init__(self, names: Sequence[str], labels: Sequence[int], channels: int, size: int,
                 mask_paths: Optional[Sequence[Optional[str]]] = None,
                 arrays: Optional[torch.Tensor] = None, augment: bool = False,
                 mask_known: Optional[Sequence[bool]] = None) -> None:
        self.names, self.labels = list(names), [int(v) for v in labels]
        self.channels, self.size, self.augment = channels, size, augment
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

    def without_augmentation(self) -> "OneClassDataset":
        """The same items, not flipped (to score the training images): no file is read again."""
        plain = OneClassDataset(self.names, self.labels, self.channels, self.size, self.mask_paths,
                                self.arrays, augment=False, mask_known=self.mask_known)
        plain._cache = self._cache
        return plain

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
        return {"image": image, "label": self.labels[index], "mask": mask,
                "mask_known": self.mask_known[index], "index": index}


def _mvtec_mask(root: Path, defect: str, image: Path) -> Optional[str]:
    for suffix in ("_mask", ""):
        path = root / "ground_truth" / defect / f"{image.stem}{suffix}.png"
        if path.is_file():
            return str(path)
    return None


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


def mvtec_dataset(root: Path, split: str, size: int, augment: bool, skip_bad_images: bool) -> OneClassDataset:
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


def folder_dataset(root: Path, split: str, size: int, augment: bool, skip_bad_images: bool) -> OneClassDataset:
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


def spec_dataset(root: Path, spec: FolderSpec, split: str, size: int, augment: bool,
                 skip_bad_images: bool) -> OneClassDataset:
    """A ``folder`` data set given by its folders (see :class:`FolderSpec`)."""
    normal, _ = images_and_masks(root / spec.normal_dir)
    train, test = split_normal(normal, spec.train_ratio)
    if split == "train":
        return file_dataset(train, [0] * len(train), size, augment, skip_bad_images)
    separate = mask_folder(root / spec.mask_dir) if spec.mask_dir else None
    files, masks = list(test), [None] * len(test)  # a normal image's mask is known: all zeros
    for folder in spec.abnormal_dirs:
        images, beside = images_and_masks(root / folder)
        found = separate if separate is not None else beside
        files += images
        masks += [str(found[p.stem]) if p.stem in found else None for p in images]
    labels = [0] * len(test) + [1] * (len(files) - len(test))
    return file_dataset(files, labels, size, augment, skip_bad_images,
                        masks if spec.abnormal_dirs else None)


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


def _torchvision_arrays(name: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision
    cls, expected = {"mnist": (torchvision.datasets.MNIST, root / "MNIST" / "raw"),
                     "cifar10": (torchvision.datasets.CIFAR10, root / "cifar-10-batches-py")}[name]
    try:
        data = cls(str(root), train=split == "train", download=False)
    except RuntimeError as e:
        hint = " or the IDX files t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in the root itself" \
            if name == "mnist" else ""
        raise FileNotFoundError(
            f"{name} not found under {root}: torchvision expects its files in {expected}{hint}; "
            "nothing is downloaded") from e
    images = torch.as_tensor(np.asarray(data.data))
    # MNIST gives (N, H, W), CIFAR-10 (N, H, W, C); both become (N, C, H, W).
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(data.targets), dtype=torch.int64)


def one_class_dataset(name: str, root: Path, split: str, size: int, normal_class: int,
                      augment: bool) -> OneClassDataset:
    if not 0 <= normal_class <= 9:
        raise ValueError(f"normal_class must be a class index 0..9, got {normal_class}")
    arrays = _mnist_idx_arrays(root, split) if name == "mnist" else None
    images, classes = arrays if arrays is not None else _torchvision_arrays(name, root, split)
    if split == "train":
        keep = (classes == normal_class).nonzero().flatten()
        images, classes = images[keep], classes[keep]
    labels = (classes != normal_class).long()
    offset = MNIST_IDX_SPLIT if arrays is not None and split == "test" else 0
    names = [f"{name}-{split}-{offset + int(i)}" for i in
             (keep if split == "train" else torch.arange(len(labels)))]
    return OneClassDataset(names, labels.tolist(), images.shape[1], size, arrays=images, augment=augment)


def build_dataset(name: str, root: str, split: str, size: int, normal_class: int = 0,
                  category: Optional[str] = None, augment: bool = False,
                  skip_bad_images: bool = False, folders: Optional[FolderSpec] = None) -> OneClassDataset:
    """The ``split`` ("train" or "test") of dataset ``name`` under ``root``, resized to ``size``.

    ``category`` selects a sub-folder of ``root`` (an MVTec AD category of a full MVTec root).
    ``skip_bad_images`` leaves unreadable image files out with a warning instead of raising.
    ``folders`` gives a ``folder`` data set by its folders instead of the train/test layout.
    """
    check_dataset_name(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(os.path.expanduser(root)) / (category or "")
    if not path.is_dir():
        raise FileNotFoundError(f"dataset root not found: {path}")
    if name == "mvtec":
        dataset = mvtec_dataset(path, split, size, augment, skip_bad_images)
    elif name == "folder" and folders is not None:
        dataset = spec_dataset(path, folders, split, size, augment, skip_bad_images)
    elif name == "folder":
        dataset = folder_dataset(path, split, size, augment, skip_bad_images)
    else:
        dataset = one_class_dataset(name, path, split, size, normal_class, augment)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {name} under {path} is empty")
    return dataset


def config_dataset(config: "TrainConfig", split: str, root: Optional[str] = None, augment: bool = False,
                   skip_bad_images: bool = False) -> OneClassDataset:
    """The ``split`` of the data set a run's config names, under ``root`` (default: the config's)."""
    folders = (FolderSpec(config.normal_dir, config.abnormal_dirs, config.mask_dir, config.train_ratio)
               if config.normal_dir else None)
    return build_dataset(config.dataset, root or config.root, split, size=config.model.size,
                         normal_class=config.normal_class, category=config.category,
                         augment=augment, skip_bad_images=skip_bad_images, folders=folders)
