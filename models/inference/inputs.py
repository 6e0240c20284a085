"""What :meth:`~models.inference.Detector.predict` accepts, as named images to read one by one.

* a path: an image file, a folder (its image files, sorted by name: :func:`~models.data.images.list_images`)
  or a glob (``"shots/**/*.png"``; its image files, sorted);
* a PIL image, a NumPy array (H, W), (H, W, C) or a batch (N, H, W, C), or a torch tensor
  (C, H, W) or a batch (N, C, H, W): uint8 pixels, or floats in [0, 1] (rounded to 8 bits as a
  file would hold them);
* a list or tuple of any of these.

A path that is missing, or a folder or glob without an image, is not an error here: it becomes a
source whose :meth:`ImageSource.read` raises, so that the other images are still scored.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..data.images import BadImageError, is_image_file, list_images, pil_to_uint8, read_pixels

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class ImageSource:
    """One image to score: a file (``path``), an image in memory (``image``: a PIL image or
    uint8 pixels), or a path that could not be expanded (``problem`` says why)."""

    name: str
    path: Optional[Path] = None
    image: Any = None
    problem: Optional[str] = None

    def read(self, channels: int) -> np.ndarray:
        """uint8 pixels, (H, W, 3) for 3 ``channels``, else (H, W); raises
        :class:`~models.data.images.BadImageError` naming an unreadable file."""
        if self.problem is not None:
            raise BadImageError([(self.name, self.problem)])
        if self.path is not None:
            return read_pixels(self.path, channels)
        image = self.image if isinstance(self.image, Image.Image) else Image.fromarray(self.image)
        return pil_to_uint8(image, channels)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are; floats in [0, 1] rounded to 8 bits."""
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.floating):
        if pixels.size and not 0.0 <= pixels.min() <= pixels.max() <= 1.0:
            raise ValueError(f"float images must be in [0, 1] (pixels / 255), got values in [{pixels.min():g}, "
                             f"{pixels.max():g}]; give the pixels, not a model's [-1, 1] input")
        return np.rint(pixels * 255).astype(np.uint8)
    raise TypeError(f"image arrays must be uint8 or floats in [0, 1], got {pixels.dtype}")


def from_array(pixels: np.ndarray, start: int) -> list[ImageSource]:
    """(H, W), (H, W, C) or (N, H, W, C) pixels as named sources ``image_<k>``, from ``start`` on."""
    if pixels.ndim not in (2, 3, 4) or (pixels.ndim >= 3 and pixels.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"an image array is (H, W), (H, W, C) or (N, H, W, C) with C of 1, 3 or 4, "
                         f"got the shape {pixels.shape}")
    batch = pixels if pixels.ndim == 4 else pixels[None]
    return [ImageSource(f"image_{start + i}", image=to_uint8(p[..., 0] if p.ndim == 3 and p.shape[-1] == 1 else p))
            for i, p in enumerate(batch)]


def from_path(text: str) -> list[ImageSource]:
    """The image files of a file, folder or glob, each named by its path."""
    path = Path(text)
    if path.is_dir():
        try:
            return [ImageSource(str(p), path=p) for p in list_images(path)]
        except FileNotFoundError as e:
            return [ImageSource(text, problem=str(e))]
    if path.exists():
        return [ImageSource(text, path=path)]
    if any(c in text for c in GLOB_CHARACTERS):
        files = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if is_image_file(p))
        return [ImageSource(str(p), path=p) for p in files] or [ImageSource(text, problem="no image matches")]
    return [ImageSource(text, problem="image not found")]


def expand(images: Union[ImageInput, Sequence[ImageInput]]) -> list[ImageSource]:
    """The sources of every image given (see the module docstring), in order."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    sources: list[ImageSource] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            sources += from_path(os.fspath(item))
        elif isinstance(item, Image.Image):
            sources.append(ImageSource(getattr(item, "filename", "") or f"image_{len(sources)}", image=item))
        elif isinstance(item, torch.Tensor):  # channels first, as torchvision
            pixels = item.detach().cpu()
            if pixels.dim() not in (3, 4):
                raise ValueError(f"an image tensor is (C, H, W) or (N, C, H, W), got the shape {tuple(item.shape)}")
            sources += from_array(pixels.movedim(-3, -1).numpy(), len(sources))
        elif isinstance(item, np.ndarray):
            sources += from_array(item, len(sources))
        else:
            raise TypeError(f"cannot read an image from a {type(item).__name__}: give a path, a folder, a glob, "
                            "a PIL image, a NumPy array or a torch tensor")
    if not sources:
        raise ValueError("no images given")
    return sources
