"""What the Triton backend can run on, how it tunes itself, and how large a problem it takes.

Pure Python (no Triton import), so that the package imports, and says "unavailable", without
Triton. Everything here is fixed at import: torch.compile traces the backend choice as a
constant, and a test that wants another path or tiling passes its own :class:`TritonConfig` to
the launchers (:mod:`daad_ext.triton.launch`) instead of overwriting module state.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # noqa: BLE001  (no triton, or a broken install: the backend is unavailable)
    HAS_TRITON = False

#: Kernels defined for Triton's interpreter (TRITON_INTERPRET=1 at import) run on CPU tensors;
#: otherwise they run on CUDA tensors.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
CUDA_AVAILABLE = HAS_TRITON and not INTERPRETED and torch.cuda.is_available()
#: dtypes of the kernels on a GPU; under the interpreter float32 only (its bf16 tl.dot is wrong).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED = ("float32, float16 and bfloat16 CUDA tensors (float32 CPU tensors under "
             "TRITON_INTERPRET=1)")

#: Largest padded N (a power of two) that the single-pass fused kernels take.
MAX_FUSED_N = 1024
#: Each D split of the tiled path's products covers a multiple of this many columns.
SPLIT_ALIGN = 64
#: Rows per partial row of the per-item sums of the cosine backward (the smallest BLOCK_R).
PART_ROWS = 16

# Limits of the kernels' indexing, checked before any launch (daad_ext/triton/checks.py). Every
# element offset is formed in int64 from int32 indices, so B*Q*N, C*H*W and the strides have no
# limit of their own beyond PyTorch's; what remains:
#: Query rows B*Q: row indices are int32, and a tile of up to 256 rows past the last must not wrap.
MAX_ROWS = 2**31 - 256
#: Items N and block length D: their tiles (at least 16 wide) span the second grid axis of the
#: tiled kernels, which CUDA caps at 65,535 programs; 2**19 leaves room for 16-wide tiles.
MAX_ITEMS = 2**19
MAX_BLOCK_DIM = 2**19


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """How the launchers choose paths and tiles. Frozen (hashable): one autotuner per config.

    Attributes:
        path: "auto", "fused" or "tiled"; "fused" still takes the tiled path when N, padded to a
            power of two, exceeds MAX_FUSED_N.
        splits: D splits of the tiled path's products; None chooses from the SM count.
        autotune: benchmark every pruned configuration (keyed on N, D); False takes the first
            that fits, which saves compile time.
        interpreter_tiles: "small" or "large": under the interpreter the autotuners run one
            configuration, the smallest tiles or the largest.
        smem_limit: shared memory per block for the autotuning filter; None asks the GPU.
    """

    path: str = "auto"
    splits: Optional[int] = None
    autotune: bool = True
    interpreter_tiles: str = "small"
    smem_limit: Optional[int] = None

    def __post_init__(self) -> None:
        if self.path not in ("auto", "fused", "tiled"):
            raise ValueError(f"path must be 'auto', 'fused' or 'tiled', got {self.path!r}")
        if self.interpreter_tiles not in ("small", "large"):
            raise ValueError(f"interpreter_tiles must be 'small' or 'large', "
                             f"got {self.interpreter_tiles!r}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits must be >= 1 or None, got {self.splits}")

    @classmethod
    def from_env(cls) -> "TritonConfig":
        """DAAD_TRITON_PATH (auto/fused/tiled) and DAAD_TRITON_AUTOTUNE (0 turns it off)."""
        path = os.environ.get("DAAD_TRITON_PATH", "auto")
        if path not in ("auto", "fused", "tiled"):
            raise ValueError(f"DAAD_TRITON_PATH must be auto, fused or tiled, got {path!r}")
        return cls(path=path, autotune=os.environ.get("DAAD_TRITON_AUTOTUNE", "1") != "0")


#: The configuration of the registered ops, read from the environment once, at import.
DEFAULT = TritonConfig.from_env()


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors of float32/float16/bfloat16; CPU float32 under Triton's interpreter."""
    if device.type == "cuda":
        return CUDA_AVAILABLE and dtype in SUPPORTED_DTYPES
    return device.type == "cpu" and dtype == torch.float32 and INTERPRETED
