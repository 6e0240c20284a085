"""The training settings of a run (:class:`TrainConfig`) and the named readings of the DAAD+ losses.

A run's settings are stored in every checkpoint and in ``config.json``; the data set's own
settings (``data``) are those of its layout (:mod:`models.data`).

Example:
    >>> from models.networks import ModelConfig
    >>> from models.training import TrainConfig
    >>> config = TrainConfig(dataset="mnist", data={"normal_class": 3},
    ...                      model=ModelConfig(model="daad+", in_channels=1, size=32, width=4, division=(2, 2, 1)))
    >>> config.learning_rate, config.fusion_gamma, config.rec_loss
    (0.0002, 0.9, 'norm')
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional, Union

import numpy as np

from ..data import OneClassDataset, build_dataset, layout
from ..networks import AnomalyDetector, TiledDetector, Tiling
from ..networks.config import MEMAE_ENTROPY_WEIGHT, ModelConfig
from ..networks.losses import check_reductions
from ..networks.maps import check_map

#: Named readings of the DAAD+ losses (``--losses``): the settings each one fixes.
#: ``old``: this project's first reading (squared distances; L_ali summed over the 100 features).
#: ``paper``: the paper's words, Eq. 4 and 6: both terms are L2 norms.
#: ``ganomaly``: GANomaly / Skip-GANomaly's code: L1 pixel term (weight 50), mean squared feature
#: difference (weight 1), discriminator re-initialised when its loss falls below 1e-5.
#: ``ssim``: ``paper`` with L_rec as the mean of 1 - SSIM, weighted 100x: SSIM's loss (at most 2 a
#: pixel, about 0.7 at the start on the magnetic tile) is about 100x smaller than the paper's norm,
#: and under the paper's weights L_ali drove the generator (64% of its gradient at epoch 1, against
#: 4% with the norm) until the reconstructions got worse (docs/MODELS.md, *Losses*).
LOSS_READINGS: dict[str, dict[str, Any]] = {
    "old": {"rec_loss": "mse", "ali_loss": "sum_sq", "d_reset": 0.0, "loss_weights": (50.0, 0.5, 0.5)},
    "paper": {"rec_loss": "norm", "ali_loss": "norm", "d_reset": 0.0, "loss_weights": (50.0, 0.5, 0.5)},
    "ganomaly": {"rec_loss": "l1", "ali_loss": "mean_sq", "d_reset": 1e-5, "loss_weights": (50.0, 0.5, 1.0)},
    "ssim": {"rec_loss": "ssim", "ali_loss": "norm", "d_reset": 0.0, "loss_weights": (5000.0, 0.5, 0.5)},
}
#: The reading a "+" variant trains with unless told otherwise (chosen by measurement: docs/MODELS.md).
DEFAULT_READING = "paper"


@dataclass
class TrainConfig:
    """Everything a run needs besides the output folder; stored in every checkpoint.

    ``dataset`` names the data layout, ``root`` its folder, ``category`` a sub-folder of it and
    ``data`` the layout's own settings (:mod:`models.data`; completed with its defaults).
    ``lr`` None means the paper's: 1e-4, or 2e-4 with the adversarial losses. ``gamma`` None means
    0.9 with a discriminator and 1 without. ``entropy_weight`` None means MemAE's 0.0002 for the
    MemAE variants and 0 otherwise. ``rec_loss`` and ``ali_loss`` are the readings of L_rec and
    L_ali (:mod:`models.networks.losses`); ``d_reset`` re-initialises the discriminator after a
    step whose loss fell below it (GANomaly's 1e-5; 0: never); these and ``loss_weights`` default
    to :data:`DEFAULT_READING` of :data:`LOSS_READINGS` with a discriminator (to ``"ssim"`` where
    ``rec_loss`` is SSIM), to ``"old"`` without.
    ``anomaly_map`` is the pixel map the run is scored by (:mod:`models.networks.maps`).

    How long a run trains (:mod:`models.training.loop`): ``epochs``, or ``steps`` optimisation steps
    (the run ends with the epoch in which it reaches them: data sets differ 20x in size), and with
    ``until_plateau`` earlier, once the validation error has not improved by ``plateau_tolerance``
    (relative) for ``plateau_window`` epochs, but not before ``plateau_min_steps`` steps. The validation set is a fixed ``val_ratio`` of the
    training images (the same for every seed), held out of training. ``eval_every`` evaluates on the
    test split every so many epochs, on a fixed subset of ``eval_subset`` images where that is > 0.

    Tiling (:mod:`models.networks.tiler`): with ``tile_size`` T the images are read, scored and
    mapped at ``model.size``, the working resolution, while the network takes T x T inputs
    (:attr:`network`): it trains on random T x T crops of the augmented images and scores them by
    tiles every ``tile_stride`` pixels (default T), stitched (:meth:`detector`).
    """

    dataset: str = "mvtec"
    root: str = ""
    category: Optional[str] = None
    data: dict[str, Any] = field(default_factory=dict)
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
    anomaly_map: str = "l2"
    seed: int = 0
    workers: int = 0
    eval_every: int = 0
    eval_subset: int = 0
    steps: Optional[int] = None
    val_ratio: float = 0.0
    until_plateau: bool = False
    plateau_window: int = 5
    plateau_tolerance: float = 0.01
    plateau_min_steps: int = 0
    tile_size: Optional[int] = None
    tile_stride: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        self.data = layout(self.dataset).parse(dict(self.data))
        self.betas = tuple(self.betas)
        # Unset loss settings come from the default reading, or from ``ssim`` for an L_rec by SSIM
        # (the default's weights are set for its norm, and do not train by SSIM); without a
        # discriminator only L_rec exists, and it keeps the first reading (mse) so that the
        # baselines' results stand.
        adversarial = self.model.variant.adversarial
        reading = LOSS_READINGS[("ssim" if self.rec_loss == "ssim" else DEFAULT_READING) if adversarial else "old"]
        for key, value in reading.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.loss_weights = tuple(self.loss_weights)
        check_reductions(self.rec_loss, self.ali_loss)
        check_map(self.anomaly_map)
        if self.d_reset < 0:
            raise ValueError(f"d_reset must be >= 0 (0: never), got {self.d_reset}")
        if self.epochs < 1 or self.batch < 1:
            raise ValueError(f"epochs and batch must be >= 1, got {self.epochs}, {self.batch}")
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.val_ratio < 1:
            raise ValueError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.until_plateau and not self.val_ratio:
            raise ValueError("until_plateau watches the validation error: give a val_ratio > 0 (--val-ratio)")
        if self.plateau_window < 1 or self.plateau_tolerance < 0 or self.eval_subset < 0 or self.plateau_min_steps < 0:
            raise ValueError("plateau_window must be >= 1, plateau_tolerance, plateau_min_steps and eval_subset >= 0, "
                             f"got {self.plateau_window}, {self.plateau_tolerance}, {self.plateau_min_steps}, "
                             f"{self.eval_subset}")
        self._check_tiling()

    def _check_tiling(self) -> None:
        if self.tile_size is None:
            if self.tile_stride is not None:
                raise ValueError("a tile stride (--tile-stride) needs a tile size (--tile-size)")
            return
        if not self.model.learns:
            raise ValueError(f"the {self.model.model} model is fitted to whole images: it takes no --tile-size")
        if self.tile_stride is None:
            self.tile_stride = self.tile_size
        Tiling(self.model.size, self.tile_size, self.tile_stride)
        self.network  # the tile must fit the network's memories too

    @property
    def network(self) -> ModelConfig:
        """The network's settings: ``model``, with the tile size as its input in a tiled run."""
        if self.tile_size is None:
            return self.model
        try:
            return replace(self.model, size=self.tile_size)
        except ValueError as e:
            raise ValueError(f"the tile size (--tile-size) is the network's input: {e}") from e

    def detector(self) -> Union[AnomalyDetector, TiledDetector]:
        """A fresh detector of the run's settings: the network, scoring by tiles in a tiled run."""
        network = AnomalyDetector(self.network)
        return network if self.tile_size is None else TiledDetector(network, self.model.size, self.tile_stride)

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

    def dataset_split(self, split: str, root: Optional[str] = None, augment: bool = False,
                      skip_bad_images: bool = False) -> OneClassDataset:
        """The ``split`` of the run's data set under ``root`` (default: the run's) at ``model.size``:
        "test", "train" (the training images less the validation ones) or "val" (a fixed
        ``val_ratio`` of them). ``augment``: flipped and, in a tiled run, cropped to tiles."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        images = build_dataset(self.dataset, root or self.root, "test" if split == "test" else "train",
                               self.model.size, augment=augment, skip_bad_images=skip_bad_images,
                               category=self.category, **self.data)
        if augment and self.tile_size is not None:
            images = images.with_crops(self.tile_size)
        if split == "test" or (split == "train" and not self.val_ratio):
            return images
        if not self.val_ratio:
            raise ValueError("the run has no validation images (val_ratio 0)")
        order = np.random.default_rng(VAL_SEED).permutation(len(images))
        cut = int(round(self.val_ratio * len(images)))
        if not 0 < cut < len(images):
            raise ValueError(f"val_ratio {self.val_ratio} leaves no image for training or for validation "
                             f"({len(images)} training images)")
        return images.subset(sorted(order[cut:] if split == "train" else order[:cut]))

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
        # Settings of checkpoints written before the data layouts had settings of their own.
        flat = {k: data[k] for k in LEGACY_DATA_KEYS if k in data}
        data = {k: v for k, v in data.items() if k not in flat}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        if flat:
            accepted = {f.name for f in fields(layout(data.get("dataset", cls.dataset)).options)}
            data["data"] = {**{k: v for k, v in flat.items() if k in accepted}, **data.get("data", {})}
        # A checkpoint written before the loss readings were options was trained with these.
        return cls(**{**LEGACY_LOSSES, **data})


#: Seed of the permutation that holds the validation images out of the training images: the same
#: for every run, so that runs of different seeds are validated on the same images.
VAL_SEED = 0
#: The loss readings of checkpoints that do not name theirs (written before they were options).
LEGACY_LOSSES = {"rec_loss": "mse", "ali_loss": "sum_sq", "d_reset": 0.0}
#: Data settings that checkpoints stored beside the others before the layouts had their own.
LEGACY_DATA_KEYS = ("normal_class", "normal_dir", "abnormal_dirs", "mask_dir", "train_ratio")
