"""Image files: which files of a folder are images, and their pixels as uint8 whatever their format.

Real folders hold more than clean 8-bit RGB files, so:

* hidden files (``.DS_Store``, macOS's ``._name.jpg``) and files without an image extension are
  ignored; a folder left with no image is an error that says how many files it ignored;
* grayscale, RGBA (the alpha channel is dropped, the stored colours kept), palette, bilevel and
  16-bit images are all read as 8-bit: 16-bit values are scaled by 255/65535, never clipped;
* masks are read by their region whatever their encoding (:func:`mask_region`): 0/255, 0/1,
  16-bit, a coloured region on black, or transparency where they have it;
* a file that cannot be decoded (a truncated JPEG, a text file named ``.jpg``) raises
  :class:`BadImageError` naming the file and the reason;
* an image of more than :data:`PIXEL_LIMIT` pixels (64 megapixels, 8000 x 8000: a few kilobytes of
  PNG can hold a decompression bomb) is refused the same way before it is decoded; the commands'
  ``--max-pixels`` sets the limit for the process (:func:`set_pixel_limit`), replacing PIL's own. PIL's ``verify()`` misses truncated
  JPEGs, so :func:`decoded_size` decodes every pixel.

Example:
    >>> import numpy as np, os, tempfile
    >>> from PIL import Image
    >>> from models.data.images import read_pixels
    >>> path = os.path.join(tempfile.mkdtemp(), "deep.png")
    >>> Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(path)
    >>> read_pixels(path, channels=3).shape, int(read_pixels(path, channels=1).max())
    ((2, 3, 3), 255)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: PIL modes of integer images wider than 8 bits (16-bit PNG and TIFF): scaled to 0..255.
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

PathLike = Union[str, os.PathLike]

#: The most pixels an image may have (see the module docstring).
PIXEL_LIMIT = 64_000_000


def add_pixel_limit_option(parser: argparse.ArgumentParser) -> None:
    """The commands' ``--max-pixels``; :func:`set_pixel_limit` applies it."""
    parser.add_argument("--max-pixels", type=int, help=f"refuse images of more pixels than this, naming them "
                        f"(default: {PIXEL_LIMIT:,}, 8000 x 8000)")


def set_pixel_limit(pixels: Optional[int]) -> None:
    """Sets :data:`PIXEL_LIMIT` for this process (``--max-pixels`` of the commands; None: unchanged)."""
    global PIXEL_LIMIT
    if pixels is None:
        return
    if pixels < 1:
        raise ValueError(f"the pixel limit must be >= 1, got {pixels}")
    PIXEL_LIMIT = int(pixels)


class BadImageError(ValueError):
    """Image files that cannot be read; ``problems`` lists each as (path, reason)."""

    def __init__(self, problems: Sequence[tuple[str, str]], hint: str = "") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {path}: {reason}" for path, reason in self.problems)
        count = len(self.problems)
        super().__init__(f"{count} unreadable image file{'s' if count > 1 else ''}:\n{lines}"
                         + (f"\n{hint}" if hint else ""))


def is_image_file(path: Path) -> bool:
    """An image by its extension, and not hidden (macOS leaves ``._name.jpg`` companions)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; raises ``FileNotFoundError`` when there is none."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    entries = list(folder.iterdir())
    files = sorted(p for p in entries if is_image_file(p))
    if not files:
        ignored = f" ({len(entries)} other entries ignored)" if entries else " (it is empty)"
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}{ignored}")
    return files


def _describe(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _decode(path: PathLike, convert: Optional[Callable[[Image.Image], np.ndarray]]
            ) -> Union[np.ndarray, tuple[int, int]]:
    """Decodes every pixel of a file (a truncated file fails here, not during training):
    ``convert`` of the image, or its (width, height) when ``convert`` is None. Any failure
    becomes a :class:`BadImageError`."""
    try:
        with _open(path) as img:
            width, height = img.size
            if width * height > PIXEL_LIMIT:
                raise BadImageError([(os.fspath(path), f"{width}x{height} is {width * height / 1e6:.1f} megapixels, "
                                                       f"over the limit of {PIXEL_LIMIT / 1e6:g} (--max-pixels)")])
            img.load()
            return img.size if convert is None else convert(img)
    except BadImageError:
        raise
    except Exception as e:  # PIL reports broken files as OSError, SyntaxError, ValueError, ...
        raise BadImageError([(os.fspath(path), _describe(e))]) from e


def _open(path: PathLike) -> Image.Image:
    """``Image.open`` with :data:`PIXEL_LIMIT` in place of PIL's own decompression-bomb limit
    (which only warns up to twice its size)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def pil_to_uint8(img: Image.Image, channels: int) -> np.ndarray:
    """A decoded image as uint8 (H, W, 3) when ``channels`` is 3, else (H, W), 16-bit ones scaled."""
    if img.mode in DEEP_MODES:
        # PIL's convert("L") would clip 16-bit values at 255 (a white image); scale them instead.
        deep = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(deep * (255 / 65535)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2) if channels == 3 else gray
    # RGBA and LA: convert drops alpha; palette (with or without transparency): its colours.
    return np.asarray(img.convert("RGB" if channels == 3 else "L"))


def read_pixels(path: PathLike, channels: int) -> np.ndarray:
    """A file as uint8 (H, W, 3) when ``channels`` is 3, else (H, W) grayscale."""
    return _decode(path, lambda img: pil_to_uint8(img, channels))


def read_mask(path: PathLike) -> np.ndarray:
    """The defect region of a mask file as bool (H, W), whatever its encoding (:func:`mask_region`)."""
    return _decode(path, mask_region)


def mask_region(img: Image.Image) -> np.ndarray:
    """The defect region of a mask image, bool (H, W). Where the image has transparency, its alpha
    decides (labelling tools that paint the defect colour everywhere mark the region by alpha
    alone); else a pixel is in the region where any channel is above half the image's largest
    value: 0/255 and 0/1 masks, 16-bit ones, and a coloured region on black (a red one would fall
    under a grey-level cut) all read right. An all-zero mask has no region."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < alpha.max():
            return alpha > alpha.max() / 2
        img = img.convert("RGB")
    values = np.asarray(img.convert("RGB") if img.mode == "P" else img).astype(np.float64)
    values = values.max(axis=2) if values.ndim == 3 else values
    peak = values.max()
    return values > peak / 2 if peak > 0 else np.zeros(values.shape, dtype=bool)


def decoded_size(path: PathLike) -> tuple[int, int]:
    """(width, height) of a file after decoding all of it: the check run when a data set is built."""
    return _decode(path, None)


def scaled_copy(mask: tuple[int, int], image: tuple[int, int]) -> bool:
    """Whether a mask of size ``mask`` covers an image of size ``image`` at some scale.

    Allows one pixel of rounding in the mask: ``mw / w == mh / h`` up to ``|e1 h - e2 w| <= (w + h) / 2``.
    """
    (mw, mh), (w, h) = mask, image
    return abs(mw * h - mh * w) <= max(w, h)
