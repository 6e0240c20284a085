"""``BlockMemory``: the block-wise memory of DAAD as a drop-in ``nn.Module``."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .autocast import autocast_inputs
from .functional import BACKENDS, available_backends, check_backend_name, in_layout_of, resolve_backend
from .spec import check_feature_map, check_options, check_temperature, make_division


class BlockMemory(nn.Module):
    """Divides a (B, C, H, W) feature map into blocks, reads each from a learnt memory, re-assembles.

    Args:
        channels, height, width: the (C, H, W) of the feature maps the layer will see.
        num_items: N, the number of memory items.
        division: (rh, rw, rc) division rates; each block has D = C/rc * H/rh * W/rw values.
        similarity: "cosine" (the paper) or "dot".
        shrink: "hard" (the paper), "memae" or "none".
        threshold: shrinkage threshold; ``None`` means 1/N.
        temperature: softmax temperature.
        backend: "auto" (fastest available for the input's device and dtype), "reference", "cpu",
            "cuda" or "triton".

    Example:
        >>> import torch
        >>> from daad_ext import BlockMemory
        >>> layer = BlockMemory(channels=16, height=32, width=32, num_items=100, division=(8, 8, 1))
        >>> layer.memory.shape
        torch.Size([100, 256])
        >>> y, w = layer(torch.randn(4, 16, 32, 32), return_weights=True)
        >>> y.shape, w.shape
        (torch.Size([4, 16, 32, 32]), torch.Size([4, 64, 100]))
    """

    def __init__(self, channels: int, height: int, width: int, num_items: int = 500,
                 division: Sequence[int] = (8, 8, 1), similarity: str = "cosine",
                 shrink: str = "hard", threshold: Optional[float] = None, temperature: float = 1.0,
                 backend: str = "auto", device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        # Everything but the input is fixed here, so it is validated once (per call: the input's
        # shape, dtype and device, and the backend for a dtype and device not seen before).
        check_feature_map(channels, height, width)
        self.geometry = make_division(channels, height, width, division)
        # The threshold resolved: 1/N where None was given, as every backend takes it.
        self.threshold = check_options(similarity, shrink, threshold, temperature, num_items)
        check_backend_name(backend)
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self.division = (self.geometry.rh, self.geometry.rw, self.geometry.rc)
        self.similarity, self.shrink = similarity, shrink
        self.temperature, self.backend = float(temperature), backend
        self.memory = nn.Parameter(torch.empty(int(num_items), self.geometry.block_dim,
                                               device=device, dtype=dtype))
        check_temperature(self.temperature, self.memory.dtype)
        self._backends: dict[tuple[torch.device, torch.dtype], str] = {}
        self.reset_parameters()

    @property
    def num_items(self) -> int:
        return self.memory.shape[0]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.geometry.block_dim)
        nn.init.uniform_(self.memory, -bound, bound)

    def _backend_for(self, x: torch.Tensor) -> str:
        """The backend for x's device and dtype, resolved (and the temperature checked against
        the dtype) the first time they are seen."""
        key = (x.device, x.dtype)
        name = self._backends.get(key)
        if name is None:
            check_temperature(self.temperature, x.dtype)
            name = resolve_backend(self.backend, x.device, x.dtype)
            # Not while torch.compile traces: the graph would be guarded on the key's absence,
            # and the entry written would fail that guard and recompile it at the next call.
            if not torch.compiler.is_compiling():
                self._backends[key] = name
        return name

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        memory = self.memory
        if not (isinstance(x, torch.Tensor) and x.dim() == 4
                and x.shape[1:] == (self.channels, self.height, self.width)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"BlockMemory was built for inputs (B, {self.channels}, {self.height}, "
                             f"{self.width}), got shape {shape}")
        cast = autocast_inputs(x, memory, self.backend, available_backends)
        if x.device != memory.device or (x.dtype != memory.dtype and cast is None):
            raise TypeError(f"BlockMemory's memory is {memory.dtype} on {memory.device}, got input "
                            f"{x.dtype} on {x.device}; move the layer or the input (.to())")
        if cast is not None:  # under torch.autocast: see daad_ext/autocast.py
            with torch.autocast(x.device.type, enabled=False):
                return self._run(*cast, return_weights)
        return self._run(x, memory, return_weights)

    def _run(self, x: torch.Tensor, memory: torch.Tensor, return_weights: bool):
        y, w = in_layout_of(x, BACKENDS[self._backend_for(x)].run(x, memory, self.geometry, self.similarity,
                                                                  self.shrink, self.threshold, self.temperature))
        return (y, w) if return_weights else y

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"channels={self.channels}, height={self.height}, width={self.width}, "
                f"division={self.division}, N={self.num_items}, Q={g.num_queries}, D={g.block_dim}, "
                f"similarity={self.similarity!r}, shrink={self.shrink!r}, "
                f"threshold={self.threshold}, temperature={self.temperature}, backend={self.backend!r}")
