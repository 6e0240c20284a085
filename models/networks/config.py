"""The model variants of the paper's ablations and the network settings (:class:`ModelConfig`).

Every variant is one :class:`~models.networks.AnomalyDetector` built from a :class:`ModelConfig`;
the variant name only switches skip connections, memories and the discriminator on or off.

Example:
    >>> from models.networks import ModelConfig
    >>> cfg = ModelConfig(model="daad+", size=64, width=8, division=(2, 2, 1))
    >>> cfg.variant
    Variant(skip=True, memory='block', adversarial=True)
    >>> ModelConfig(model="daad", size=64)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: input size 64 does not fit division (8, 8, 1) ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from daad_ext.functional import check_backend_name


class Variant(NamedTuple):
    """What a model name switches on: skip connections, the kind of memory, the discriminator."""

    skip: bool
    #: "none"; "block" (DAAD: a block-wise memory on every pooled encoder output that is used);
    #: "pixel" (MemAE: one pixel-wise memory at H/16 with MemAE's own addressing).
    memory: str
    adversarial: bool = False


#: The paper's ablation (Table 3); a trailing "+" adds the discriminator (DAAD+ = "daad+").
BASE_VARIANTS = {
    "ae": Variant(skip=False, memory="none"),
    "ae+skip": Variant(skip=True, memory="none"),
    "memae": Variant(skip=False, memory="pixel"),
    "daad": Variant(skip=True, memory="block"),
}
#: The detector that learns nothing (:mod:`models.networks.baseline`): no network, no memory.
MEAN_IMAGE = "mean-image"
MODEL_NAMES = tuple(name + suffix for suffix in ("", "+") for name in BASE_VARIANTS) + (MEAN_IMAGE,)

#: MemAE's module as in its official code (memory_module.py): dot-product addressing (the
#: paper's text says cosine, the code uses a plain linear layer), hard shrinkage with threshold
#: 0.0025, and an entropy loss on the weights with weight 0.0002.
MEMAE_MEMORY = {"similarity": "dot", "shrink": "memae", "threshold": 0.0025}
MEMAE_ENTROPY_WEIGHT = 0.0002
#: DAAD's block-wise memory (paper Sec. 3.2): cosine similarity, hard shrinkage at 1/N.
DAAD_MEMORY = {"similarity": "cosine", "shrink": "hard", "threshold": None}

#: Downsampling factor of the generator: four 2x2 max-pools.
DEPTH = 4


def parse_model(name: str) -> Variant:
    """The :class:`Variant` of a model name from :data:`MODEL_NAMES`."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if name == MEAN_IMAGE:
        return Variant(skip=False, memory="none")
    adversarial = name.endswith("+") and name[:-1] in BASE_VARIANTS
    return BASE_VARIANTS[name[:-1] if adversarial else name]._replace(adversarial=adversarial)


@dataclass
class ModelConfig:
    """The network: variant, image channels, input size, width multiplier and memory settings.

    ``width`` 64 is the paper's; ``division`` and ``num_items`` are the same at every scale.
    The input is ``size`` x ``size``; the memories see maps of ``size / 2**k`` for k = 1..4.
    """

    model: str = "daad"
    in_channels: int = 3
    size: int = 256
    width: int = 64
    division: tuple[int, int, int] = (8, 8, 1)
    num_items: int = 500
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.division = tuple(int(r) for r in self.division)
        variant = parse_model(self.model)
        if len(self.division) != 3 or min(self.division) < 1:
            raise ValueError(f"division must be three integers >= 1 (rh, rw, rc), got {self.division}")
        if self.in_channels < 1 or self.width < 1 or self.num_items < 1:
            raise ValueError("in_channels, width and num_items must be >= 1, got "
                             f"{self.in_channels}, {self.width}, {self.num_items}")
        if self.learns:  # the mean image takes any size; the generator's four pools need multiples of 16
            check_size(self.size, self.division if variant.memory == "block" else (1, 1, 1))
        check_backend_name(self.backend)
        rc = self.division[2] if variant.memory == "block" else 1
        if self.width % rc:
            raise ValueError(f"width {self.width} is not divisible by the channel division rate "
                             f"rc={rc}; the first memory sees {self.width} channels")

    @property
    def learns(self) -> bool:
        """False for the mean training image, which is fitted, not trained."""
        return self.model != MEAN_IMAGE

    @property
    def variant(self) -> Variant:
        return parse_model(self.model)

    def memory_scales(self) -> tuple[int, ...]:
        """Indices k (0..3, the map at H / 2**(k+1)) of the pooled outputs that get a memory.

        The H/16 memory feeds the bottleneck; the others only feed skip connections, so a
        variant without skips has none there.
        """
        v = self.variant
        if v.memory == "none":
            return ()
        return tuple(range(DEPTH)) if v.memory == "block" and v.skip else (DEPTH - 1,)

    def memory_options(self, scale: int) -> dict[str, Any]:
        """Keyword arguments of the ``BlockMemory`` at pooled output ``scale`` (0..3)."""
        side = self.size >> (scale + 1)
        if self.variant.memory == "pixel":
            return dict(division=(side, side, 1), num_items=self.num_items, backend=self.backend,
                        **MEMAE_MEMORY)
        return dict(division=self.division, num_items=self.num_items, backend=self.backend,
                    **DAAD_MEMORY)


def check_size(size: int, division: tuple[int, int, int]) -> None:
    """Raises ``ValueError`` naming the valid sizes unless the memories can divide every scale.

    The smallest memory map is size/16; rh and rw must divide it (and then divide the larger
    maps too), so the valid sizes are the multiples of 16 * lcm(rh, rw).
    """
    rh, rw, _ = division
    step = 2 ** DEPTH * math.lcm(rh, rw)
    if not isinstance(size, int) or size < step or size % step:
        valid = ", ".join(str(step * k) for k in range(1, 5))
        raise ValueError(
            f"input size {size} does not fit division {tuple(division)}: the size must be a multiple "
            f"of 16 whose quotient by 16 (the H/16 memory map) rh={rh} and rw={rw} divide; valid "
            f"sizes are the multiples of {step}: {valid}, ...")
