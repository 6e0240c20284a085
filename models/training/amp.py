"""Mixed-precision training: autocast around the forward passes, a gradient scaler for float16.

``--amp bf16`` (CPU or CUDA) or ``--amp fp16`` (CUDA) of ``python -m models.train``. The weights
and optimizer states stay float32; convolutions and the memories (see daad_ext/autocast.py) run in
the low-precision dtype where they can. float16 gradients can overflow, so on CUDA they are scaled
(``torch.amp.GradScaler``), which skips a step whose gradients are not finite and lowers the scale;
bfloat16 has float32's range and needs no scaling.

Example:
    >>> import torch
    >>> from models.training.amp import MixedPrecision
    >>> amp = MixedPrecision(torch.device("cpu"), torch.bfloat16)
    >>> with amp.autocast():
    ...     torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype
    torch.bfloat16
"""
from __future__ import annotations

from typing import Optional

import torch

#: ``--amp`` names and the dtypes they select.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast to ``dtype`` on ``device`` (``dtype`` None: full precision, nothing changes)."""

    def __init__(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
        if dtype not in (None, *AMP_DTYPES.values()):
            raise ValueError(f"mixed precision takes bfloat16 or float16, got {dtype}")
        if dtype == torch.float16 and device.type != "cuda":
            raise ValueError(f"float16 mixed precision needs a CUDA device, got {device}; use bf16")
        self.device_type, self.dtype = device.type, dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Back-propagates ``loss``; leaves the true (unscaled) gradients in ``.grad``."""
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)

    def update(self) -> None:
        """Once per training step, after every optimizer's :meth:`step`."""
        self.scaler.update()
