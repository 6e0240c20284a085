"""High-resolution scoring by tiles, as anomalib's ``Tiler``: a detector whose network takes
``tile`` x ``tile`` inputs scores images of a larger working resolution ``size`` tile by tile.

The image is cut into tiles with ``stride`` (overlapping where the stride is smaller than the
tile), the network scores every tile as one batch, and the tiles' maps and reconstructions are
stitched back into one of the working resolution, each pixel the mean of the tiles that cover
it. The tiles must cover the image exactly: ``size - tile`` a multiple of ``stride`` (anomalib
pads or resizes the image to make it so; here the options must fit, and a clear error says which
strides do). Tiling is ``F.unfold``, stitching two matrix products (exportable to ONNX and OpenVINO).

Example:
    >>> import torch
    >>> from models.networks import AnomalyDetector, ModelConfig, TiledDetector
    >>> net = AnomalyDetector(ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1)))
    >>> tiled = TiledDetector(net, size=64, stride=16).eval()
    >>> s = tiled.score(torch.zeros(2, 3, 64, 64))
    >>> s.error_map.shape, s.feat.shape
    (torch.Size([2, 64, 64]), torch.Size([2]))
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from daad_ext import BlockMemory

from .config import ModelConfig
from .detector import AnomalyDetector, Scores
from .maps import without_autocast


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile`` x ``tile`` pixels every ``stride`` pixels over a ``size`` x ``size`` image."""

    size: int
    tile: int
    stride: int

    def __post_init__(self) -> None:
        if self.tile < 1 or self.tile > self.size:
            raise ValueError(f"the tile size {self.tile} (--tile-size) must be between 1 and the image "
                             f"size {self.size} (--size)")
        if not 1 <= self.stride <= self.tile:
            raise ValueError(f"the tile stride {self.stride} (--tile-stride) must be between 1 and the tile "
                             f"size {self.tile} (--tile-size): a larger stride leaves pixels that no tile covers")
        if (self.size - self.tile) % self.stride:
            fitting = [s for s in range(1, self.tile + 1) if (self.size - self.tile) % s == 0]
            raise ValueError(f"the tile stride {self.stride} (--tile-stride) does not tile the image: tiles of "
                             f"{self.tile} from the image size {self.size} (--size) need a stride that divides "
                             f"{self.size - self.tile}; strides that fit: {', '.join(map(str, fitting[-6:]))}")

    @property
    def per_side(self) -> int:
        """Tiles along each side."""
        return (self.size - self.tile) // self.stride + 1

    @property
    def count(self) -> int:
        """Tiles per image."""
        return self.per_side ** 2

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, size, size) -> (B * count, C, tile, tile), image by image, each row by row."""
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"a tiled detector scores images of {self.size} x {self.size}, got "
                             f"{tuple(x.shape[-2:])}")
        channels = x.shape[1]
        columns = F.unfold(x, self.tile, stride=self.stride)  # (B, C * tile * tile, count)
        return columns.transpose(1, 2).reshape(-1, channels, self.tile, self.tile)

    def placement(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(per_side * tile, size): row ``i * tile + a`` is one at pixel ``i * stride + a``, where
        row ``a`` of the ``i``-th tile along a side lies in the image."""
        rows = torch.arange(self.per_side * self.tile, device=device)
        return F.one_hot((rows // self.tile) * self.stride + rows % self.tile, self.size).to(dtype)

    def merge(self, tiles: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`split`: (B * count, C, tile, tile) -> (B, C, size, size), each
        pixel the mean of the tiles that cover it, in float32. The tiles are placed by two products
        with :meth:`placement` (rows, then columns): matrix products export to every runtime, where
        ``F.fold``'s scatter does not convert to OpenVINO. Under autocast they would round the maps
        to bfloat16, which the untiled detector's float32 maps are not: autocast is off here."""
        channels, n, t = tiles.shape[1], self.per_side, self.tile
        grid = tiles.float().reshape(-1, n, n, channels, t, t).permute(0, 3, 1, 4, 2, 5)
        grid = grid.reshape(-1, channels, n * t, n * t)
        place = self.placement(torch.float32, tiles.device)
        covered = place.sum(0)  # tiles over each row (and column) of the image
        with without_autocast(tiles.device.type):
            return (place.T @ grid @ place) / (covered[:, None] * covered[None, :])


class TiledDetector(nn.Module):
    """An :class:`AnomalyDetector` (its network takes tiles, ``detector.config.size``) that scores
    images of ``size`` x ``size`` by tiles every ``stride`` pixels (:class:`Tiling`).

    Its ``config`` is the network's with the working ``size`` (what its inputs are);
    ``generator``, ``discriminator`` and ``memories()`` are the network's, so that training,
    checkpoints and speed options treat it as the detector it wraps.
    """

    def __init__(self, detector: AnomalyDetector, size: int, stride: int) -> None:
        super().__init__()
        self.detector = detector
        self.tiling = Tiling(size, detector.config.size, stride)
        self.config: ModelConfig = replace(detector.config, size=size)

    @property
    def generator(self) -> nn.Module:
        return self.detector.generator

    @property
    def discriminator(self) -> Optional[nn.Module]:
        return self.detector.discriminator

    def memories(self) -> list[BlockMemory]:
        return self.detector.memories()

    @torch.no_grad()
    def score(self, x: torch.Tensor, ali_reduction: str = "sum_sq", anomaly_map: str = "l2") -> Scores:
        """:meth:`AnomalyDetector.score` of the stitched tiles: the reconstruction and the map at the
        working size, R(x) the mean of the map, and L(x) the largest of the tiles' L: a defect lies
        in a few tiles, and a mean over all of them would dilute its distance by the tile count."""
        s = self.detector.score(self.tiling.split(x), ali_reduction, anomaly_map)
        error_map = self.tiling.merge(s.error_map[:, None])[:, 0]
        feat = None if s.feat is None else s.feat.reshape(-1, self.tiling.count).amax(dim=1)
        return Scores(self.tiling.merge(s.reconstruction), error_map, error_map.flatten(1).mean(dim=1), feat)
