"""Configurations: the model variants of the paper's ablations and the training settings.

Every variant is one :class:`~models.networks.AnomalyDetector` built from a :class:`ModelConfig`;
the variant name only switches skip connections, memories and the discriminator on or off.

Example:
    >>> from models.config import ModelConfig
    >>> cfg = ModelConfig(model="daad+", size=64, width=8, division=(2, 2, 1))
    >>> cfg.variant
    Variant(skip=True, memory='block', adversarial=True)
    >>> ModelConfig(model="daad", size=64)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: input size 64 does not fit division (8, 8, 1) ...
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple, Optional

from daad_ext.functional import check_backend_name

from .losses import check_reductions


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
MODEL_NAMES = tuple(name + suffix for suffix in ("", "+") for name in BASE_VARIANTS)

#: MemAE's module as in its official code (memory_module.py): dot-product addressing (the
#: paper's text says cosine, the code uses a plain linear layer), hard shrinkage with threshold
#: 0.0025, and an entropy loss on the weights with weight 0.0002.
MEMAE_MEMORY = {"similarity": "dot", "shrink": "memae", "threshold": 0.0025}
MEMAE_ENTROPY_WEIGHT = 0.0002
#: DAAD's block-wise memory (paper Sec. 3.2): cosine similarity, hard shrinkage at 1/N.
DAAD_MEMORY = {"similarity": "cosine", "shrink": "hard", "threshold": None}

#: Named readings of the DAAD+ losses (``--losses``): the settings each one fixes.
#: ``old``: this project's first reading (squared distances; L_ali summed over the 100 features).
#: ``paper``: the paper's words, Eq. 4 and 6: both terms are L2 norms.
#: ``ganomaly``: GANomaly / Skip-GANomaly's code: L1 pixel term (weight 50), mean squared feature
#: difference (weight 1), discriminator re-initialised when its loss falls below 1e-5.
LOSS_READINGS: dict[str, dict[str, Any]] = {
    "old": {"rec_loss": "mse", "ali_loss": "sum_sq", "d_reset": 0.0, "loss_weights": (50.0, 0.5, 0.5)},
    "paper": {"rec_loss": "norm", "ali_loss": "norm", "d_reset": 0.0, "loss_weights": (50.0, 0.5, 0.5)},
    "ganomaly": {"rec_loss": "l1", "ali_loss": "mean_sq", "d_reset": 1e-5, "loss_weights": (50.0, 0.5, 1.0)},
}
#: The reading a "+" variant trains with unless told otherwise (chosen by measurement: docs/MODELS.md).
DEFAULT_READING = "paper"


#: Downsampling factor of the generator: four 2x2 max-pools.
DEPTH = 4


def parse_model(name: str) -> Variant:
    """The :class:`Variant` of a model name from :data:`MODEL_NAMES`."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
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
        check_size(self.size, self.division if variant.memory == "block" else (1, 1, 1))
        check_backend_name(self.backend)
        rc = self.division[2] if variant.memory == "block" else 1
        if self.width % rc:
            raise ValueError(f"width {self.width} is not divisible by the channel division rate "
                             f"rc={rc}; the first memory sees {self.width} channels")

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


@dataclass
class TrainConfig:
    """Everything a run needs besides the output folder; stored in every checkpoint.

    ``lr`` None means the paper's: 1e-4, or 2e-4 with the adversarial losses. ``gamma`` None means
    0.9 with a discriminator and 1 without. ``entropy_weight`` None means MemAE's 0.0002 for the
    MemAE variants and 0 otherwise. ``rec_loss`` and ``ali_loss`` are the readings of L_rec and
    L_ali (:mod:`models.losses`); ``d_reset`` re-initialises the discriminator after a step whose
    loss fell below it (GANomaly's 1e-5; 0: never); these and ``loss_weights`` default to
    :data:`DEFAULT_READING` of :data:`LOSS_READINGS` with a discriminator, to ``"old"`` without.
    ``normal_dir``, ``abnormal_dirs``, ``mask_dir`` and ``train_ratio`` describe a ``folder`` data
    set given by its folders (:mod:`models.data`).
    """

    dataset: str = "mvtec"
    root: str = ""
    category: Optional[str] = None
    normal_class: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 100
    batch: int = 8
    lr: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    loss_weights: Optional[tuple[float, float, float]] = None
    entropy_weight: Optional[float] = None
    gamma: Optional[float] = None
    rec_loss: Optional[str] = None
    ali_loss: Optional[str] = None
    d_reset: Optional[float] = None
    seed: int = 0
    workers: int = 0
    eval_every: int = 0
    normal_dir: Optional[str] = None
    abnormal_dirs: tuple[str, ...] = ()
    mask_dir: Optional[str] = None
    train_ratio: float = 0.8

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        self.betas = tuple(self.betas)
        # Unset loss settings come from the default reading; without a discriminator only L_rec
        # exists, and it keeps the first reading (mse) so that the baselines' results stand.
        reading = LOSS_READINGS[DEFAULT_READING if self.model.variant.adversarial else "old"]
        for key, value in reading.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.loss_weights = tuple(self.loss_weights)
        self.abnormal_dirs = tuple(self.abnormal_dirs)
        check_reductions(self.rec_loss, self.ali_loss)
        if self.d_reset < 0:
            raise ValueError(f"d_reset must be >= 0 (0: never), got {self.d_reset}")
        if not 0 < self.train_ratio < 1:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.train_ratio}")
        if self.epochs < 0 or self.batch < 1:
            raise ValueError(f"epochs must be >= 0 and batch >= 1, got {self.epochs}, {self.batch}")
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.model.variant.adversarial else 1e-4

    @property
    def fusion_gamma(self) -> float:
        if self.gamma is not None:
            return self.gamma
        return 0.9 if self.model.variant.adversarial else 1.0

    @property
    def memae_entropy_weight(self) -> float:
        if self.entropy_weight is not None:
            return self.entropy_weight
        return MEMAE_ENTROPY_WEIGHT if self.model.variant.memory == "pixel" else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (lists for tuples), loadable with ``weights_only=True``."""
        def plain(value):
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        # A checkpoint written before the loss readings were options was trained with these.
        return cls(**{**LEGACY_LOSSES, **data})


#: The loss readings of checkpoints that do not name theirs (written before they were options).
LEGACY_LOSSES = {"rec_loss": "mse", "ali_loss": "sum_sq", "d_reset": 0.0}
