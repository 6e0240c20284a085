"""daad_ext: the block-wise memory of DAAD (Hou et al., ICCV 2021) with fused CPU and GPU kernels."""
from .functional import available_backends, block_memory
from .module import BlockMemory
from .reference import block_memory_ref

__all__ = ["BlockMemory", "available_backends", "block_memory", "block_memory_ref"]
__version__ = "0.1.0"
