"""Which runs the study makes: its settings, the ablation, the block sizes, the DAAD+ loss
readings and the MNIST digits.

At 64x64 input the memories see maps of 32, 16, 8 and 4 pixels: division 2 gives the block sizes
(16, 8, 4, 2) of the paper's division 8 at 256x256, and divisions 1, 2, 4 correspond to the
paper's 4, 8, 16.

Runs are listed in the order that makes a study stopped part way most useful: the no-learning
baseline (one run: it has no seed), every cell of seed 0; then, for the other seeds, DAAD, DAAD+
with the ablation's reading and the AE (the comparisons the study exists for), the other readings, and the
remaining cells; then MNIST: DAAD on every digit, then DAAD+ under each reading in
``mnist_readings``, then each model of ``mnist_baselines``, on every digit, seed by seed.

Example:
    >>> from models.study.plan import SETTINGS, plan
    >>> len(plan(SETTINGS["quick"]))
    10
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..training import DEFAULT_READING

ABLATION = ("ae", "memae", "ae+skip", "daad", "daad+")
#: The detector that learns nothing (:func:`models.networks.fit_mean_image`): every model must beat it.
BASELINE = "mean-image"


@dataclass(frozen=True)
class Setting:
    """Sizes and budgets of one version of the study.

    ``dataset`` is the data set of the ablation and block-size study: ``mvtec`` (the hazelnut
    subset) or ``tile`` (the magnetic tile, split at ``train_ratio``). ``readings`` are the DAAD+
    loss readings compared (:data:`models.training.LOSS_READINGS`), ``plus_reading`` the one of
    DAAD+ in the ablation, the claims and the learning-rate runs. ``size`` is the images'
    resolution; with ``tile_size`` the networks take tiles of it (``tile_stride`` apart when
    scoring: :class:`models.training.TrainConfig`), and the block sizes follow the tile.
    """

    size: int
    width: int
    epochs: int
    mnist_size: int
    mnist_width: int
    mnist_epochs: int
    digits: tuple[int, ...]
    seeds: int
    num_items: int = 500
    dataset: str = "mvtec"
    train_ratio: float = 0.5
    readings: tuple[str, ...] = (DEFAULT_READING,)
    plus_reading: str = DEFAULT_READING
    #: Besides DAAD, the models trained on every MNIST digit: the other models of the ablation
    #: and DAAD+ under these loss readings. MNIST is where the digits spread the models apart
    #: (the hazelnut subset is saturated, the magnetic tile near chance).
    mnist_baselines: tuple[str, ...] = ()
    mnist_readings: tuple[str, ...] = ()
    #: Learning rates tried for DAAD+ besides its default, on the setting's image data set (by
    #: ``plus_reading``) and, where DAAD+ trains on MNIST, on every digit (by the default reading).
    plus_lrs: tuple[float, ...] = ()
    #: Training to convergence (:class:`models.training.TrainConfig`'s fields of the same names):
    #: at most ``steps`` optimisation steps (None: ``epochs``), stopping earlier once the error on
    #: the held-out ``val_ratio`` of the training images plateaus over ``plateau_window`` epochs;
    #: test AUROCs on a fixed ``eval_subset`` every ``eval_every`` epochs for the learning curves.
    steps: Optional[int] = None
    val_ratio: float = 0.0
    until_plateau: bool = False
    plateau_window: int = 5
    plateau_min_steps: int = 0
    eval_every: int = 0
    eval_subset: int = 0
    tile_size: Optional[int] = None
    tile_stride: Optional[int] = None
    #: The pixel map every run is scored by, which the validation error also watches
    #: (:mod:`models.networks.maps`), and the reconstruction loss of every run (None: each
    #: model's own; DAAD+'s loss reading keeps its other terms).
    anomaly_map: str = "l2"
    rec_loss: Optional[str] = None
    #: Whether DAAD also trains at every other block division (paper Table 4).
    block_study: bool = True
    #: The models of the ablation that train (the mean image always scores: it costs seconds).
    models: tuple[str, ...] = ABLATION

    def __post_init__(self) -> None:
        if self.plus_reading not in self.readings:
            raise ValueError(f"plus_reading {self.plus_reading!r} is not one of the readings {self.readings}")
        if unknown := set(self.models) - set(ABLATION):
            raise ValueError(f"models {sorted(unknown)} are not in the ablation {ABLATION}")

    @property
    def network_size(self) -> int:
        """The networks' input: the tile in a tiled setting, else the image."""
        return self.tile_size or self.size


#: The budget of the converged studies: 10% of the normal training images held out, a plateau
#: over 8 epochs (about 430 steps on the magnetic tile) after at least 1,000 steps, never more than
#: 3,000 steps. The minimum is for SSIM: its validation error sits flat at about 0.22 for the first
#: 400-750 steps on the tile, and stopped DAAD (seed 2) there at step 486; every run stopped by
#: the plateau under the squared error went past 1,200 steps.
CONVERGED = dict(steps=3000, val_ratio=0.1, until_plateau=True, plateau_window=8, plateau_min_steps=1000,
                 eval_every=4, eval_subset=96)

SETTINGS = {
    "full": Setting(size=64, width=16, epochs=100, mnist_size=32, mnist_width=16, mnist_epochs=10,
                    digits=tuple(range(10)), seeds=3, readings=("old", "paper", "ganomaly"),
                    mnist_baselines=("ae", "memae", "ae+skip"), mnist_readings=("paper", "old"),
                    plus_lrs=(1e-4,)),
    "quick": Setting(size=64, width=8, epochs=10, mnist_size=32, mnist_width=8, mnist_epochs=2,
                     digits=(0, 1), seeds=1),
    # 476 training images (half of MT_Free), 8 epochs of 59 steps: 3-8 minutes a run on one
    # shared core, about 2.5 hours for all 27.
    "tile": Setting(size=64, width=16, epochs=8, mnist_size=32, mnist_width=16, mnist_epochs=0,
                    digits=(), seeds=3, dataset="tile", train_ratio=0.5,
                    readings=("paper", "ganomaly", "old"), plus_lrs=(1e-4,)),
    # The magnetic tile at 128 x 128 (blocks of 16, 8, 4, 2 pixels at division 4, the paper's
    # at 256 x 256), every run trained to the plateau: 0.2-0.5 s a step on one core, so up to
    # 25 minutes a run and several sessions for all 25 (the study resumes run by run).
    "tile128": Setting(size=128, width=16, epochs=1000, mnist_size=32, mnist_width=16, mnist_epochs=0,
                       digits=(), seeds=3, dataset="tile", train_ratio=0.5, **CONVERGED),
    # "tile128" trained and scored by SSIM (Bergmann et al., VISAPP 2019: on textures it sees
    # changes of structure that a squared error averages away), the ablation only.
    # DAAD+ by the ``ssim`` reading, which weights SSIM for its scale, and by ``paper``'s weights.
    "tile128-ssim": Setting(size=128, width=16, epochs=1000, mnist_size=32, mnist_width=16, mnist_epochs=0,
                            digits=(), seeds=3, dataset="tile", train_ratio=0.5, anomaly_map="ssim", rec_loss="ssim",
                            readings=("ssim", "paper"), plus_reading="ssim", block_study=False, **CONVERGED),
    # The magnetic tile at 256 x 256, where defects a few pixels wide at 128 are twice as wide, by
    # the networks of "tile128" (same blocks, same budget: a step costs the same) trained on
    # random 128 x 128 crops and scoring 9 tiles 64 apart: each pixel away from the border is
    # seen by 2 to 4 tiles, which averages out the seams, where a tile's reconstruction is worst.
    # One seed of the ablation: every model's image AUROC in it is below its "tile128" mean by more
    # than that setting's seed spread, so the tiles do not help here; the block sizes are "tile128"'s.
    "tile256-tiled": Setting(size=256, tile_size=128, tile_stride=64, width=16, epochs=1000, mnist_size=32,
                             mnist_width=16, mnist_epochs=0, digits=(), seeds=1, dataset="tile", train_ratio=0.5,
                             block_study=False, **CONVERGED),
    # The hazelnut subset at 128 x 128 to the plateau: 25 training images are 3 steps an epoch,
    # so the plateau is watched over 100 epochs (300 steps) and the test subset every 20.
    "hazelnut128": Setting(size=128, width=16, epochs=1000, mnist_size=32, mnist_width=16, mnist_epochs=0,
                           digits=(), seeds=3, **{**CONVERGED, "plateau_window": 100, "eval_every": 20}),
}
# "tile128-ssim" with twice the step limit (the plateau rule unchanged), DAAD and the AE at one seed
# (89 and 66 minutes of training on a shared core; both stopped at the plateau near step 4,800): at
# 3,000 steps DAAD's test AUROC was still rising in 5 of 6 runs (DAAD, DAAD+), and every AE and
# DAAD run had reached the limit with its validation error still falling. Its runs have the settings
# of "tile128-ssim"'s seed 0 but for the limit; they are not the same runs (validation errors of the
# first 7 epochs up to 2% apart).
SETTINGS["tile128-ssim-long"] = replace(SETTINGS["tile128-ssim"], seeds=1, readings=("ssim",),
                                        models=("ae", "daad"), steps=6000)


@dataclass(frozen=True)
class Run:
    dataset: str          # "mvtec", "tile" or "mnist"
    model: str
    division: int         # rh = rw; rc = 1
    seed: int
    normal_class: int = 0
    #: Loss reading of a "+" variant (:data:`models.training.LOSS_READINGS`); "" for the others.
    reading: str = ""
    #: Adam's learning rate; 0 is the model's default (``TrainConfig.learning_rate``).
    lr: float = 0.0

    @property
    def name(self) -> str:
        suffix = (f"-{self.reading}" if self.reading else "") + (f"-lr{self.lr:g}" if self.lr else "")
        return f"{self.dataset}-{self.model}-div{self.division}-class{self.normal_class}-seed{self.seed}{suffix}"


def block_divisions(size: int) -> list[int]:
    """Division rates r (r x r x 1) that divide the smallest memory map, size / 16."""
    return [r for r in range(1, size // 16 + 1) if (size // 16) % r == 0]


def default_division(size: int) -> int:
    """The rate whose blocks match the paper's division 8 at 256x256: 8 * size / 256, at least 1."""
    return max(1, size * 8 // 256)


def ablation_division(model: str, setting: Setting) -> int:
    """The division of a model in the ablation: the default for DAAD(+), 1 (unused) for the others."""
    return default_division(setting.network_size) if model in ("daad", "daad+") else 1


def plan(setting: Setting) -> list[Run]:
    """Every run of the study, in the order of the module docstring; shared cells listed once."""
    div, data = default_division(setting.network_size), setting.dataset
    readings = sorted(setting.readings, key=lambda r: r != setting.plus_reading)  # the ablation's first

    def cells(s: int) -> list[list[Run]]:
        return [[Run(data, "daad", div, s), Run(data, "daad+", div, s, reading=readings[0]), Run(data, "ae", 1, s)],
                [Run(data, "daad+", div, s, reading=readings[0], lr=lr) for lr in setting.plus_lrs]
                + [Run(data, "daad+", div, s, reading=r) for r in readings[1:]],
                [Run(data, m, 1, s) for m in ABLATION if m not in ("ae", "daad", "daad+")]
                + [Run(data, "daad", r, s) for r in block_divisions(setting.network_size)
                   if r != div and setting.block_study]]

    def trained(s: int, group: int) -> list[Run]:
        return [run for run in cells(s)[group] if run.model in setting.models]

    runs = [Run(data, BASELINE, 1, 0)] if setting.seeds else []
    runs += [run for group in range(3) for run in trained(0, group)] if setting.seeds else []
    for group in range(3):
        runs += [run for s in range(1, setting.seeds) for run in trained(s, group)]
    mnist_div = default_division(setting.mnist_size)
    runs += [Run("mnist", "daad", mnist_div, s, digit) for digit in setting.digits
             for s in range(setting.seeds)]
    # then DAAD+ (readings, then learning rates), then the other models: a stable sort keeps each group's order
    later = sorted((c for c in mnist_cells(setting) if c[0] != "daad"), key=lambda c: c[0] != "daad+")
    runs += [Run("mnist", m, mnist_div if m == "daad+" else 1, s, digit, reading=r, lr=lr) for m, r, lr in later
             for s in range(setting.seeds) for digit in setting.digits]
    return runs


def mnist_cells(setting: Setting) -> list[tuple[str, str, float]]:
    """The MNIST columns of the study, (model, DAAD+ loss reading, learning rate), in the
    ablation's order."""
    cells = [(m, "", 0.0) for m in ABLATION if m in setting.mnist_baselines] + [("daad", "", 0.0)]
    cells += [("daad+", r, 0.0) for r in setting.mnist_readings]
    if DEFAULT_READING in setting.mnist_readings:
        cells += [("daad+", DEFAULT_READING, lr) for lr in setting.plus_lrs]
    return cells
