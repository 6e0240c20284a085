"""Which runs the study makes: its settings, the ablation, the block sizes, the DAAD+ loss
readings and the MNIST digits.

At 64x64 input the memories see maps of 32, 16, 8 and 4 pixels: division 2 gives the block sizes
(16, 8, 4, 2) of the paper's division 8 at 256x256, and divisions 1, 2, 4 correspond to the
paper's 4, 8, 16.

Runs are listed in the order that makes a study stopped part way most useful: every cell of
seed 0 first; then, for the other seeds, DAAD and DAAD+ with the default reading (the comparison
the study exists for), the other readings, and the remaining cells.

Example:
    >>> from models.study.plan import SETTINGS, plan
    >>> len(plan(SETTINGS["quick"]))
    9
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_READING

ABLATION = ("ae", "memae", "ae+skip", "daad", "daad+")


@dataclass(frozen=True)
class Setting:
    """Sizes and budgets of one version of the study.

    ``dataset`` is the data set of the ablation and block-size study: ``mvtec`` (the hazelnut
    subset) or ``tile`` (the magnetic tile, split at ``train_ratio``). ``readings`` are the DAAD+
    loss readings compared (:data:`models.config.LOSS_READINGS`).
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


SETTINGS = {
    "full": Setting(size=64, width=16, epochs=100, mnist_size=32, mnist_width=16, mnist_epochs=10,
                    digits=tuple(range(10)), seeds=3, readings=("old", "paper", "ganomaly")),
    "quick": Setting(size=64, width=8, epochs=10, mnist_size=32, mnist_width=8, mnist_epochs=2,
                     digits=(0, 1), seeds=1),
    # 476 training images (half of MT_Free), 8 epochs of 59 steps: 3-8 minutes a run on one
    # shared core, about 2.5 hours for all 27.
    "tile": Setting(size=64, width=16, epochs=8, mnist_size=32, mnist_width=16, mnist_epochs=0,
                    digits=(), seeds=3, dataset="tile", train_ratio=0.5,
                    readings=("paper", "ganomaly", "old")),
}


@dataclass(frozen=True)
class Run:
    dataset: str          # "mvtec", "tile" or "mnist"
    model: str
    division: int         # rh = rw; rc = 1
    seed: int
    normal_class: int = 0
    #: Loss reading of a "+" variant (:data:`models.config.LOSS_READINGS`); "" for the others.
    reading: str = ""

    @property
    def name(self) -> str:
        suffix = f"-{self.reading}" if self.reading else ""
        return f"{self.dataset}-{self.model}-div{self.division}-class{self.normal_class}-seed{self.seed}{suffix}"


def block_divisions(size: int) -> list[int]:
    """Division rates r (r x r x 1) that divide the smallest memory map, size / 16."""
    return [r for r in range(1, size // 16 + 1) if (size // 16) % r == 0]


def default_division(size: int) -> int:
    """The rate whose blocks match the paper's division 8 at 256x256: 8 * size / 256, at least 1."""
    return max(1, size * 8 // 256)


def ablation_division(model: str, setting: Setting) -> int:
    """The division of a model in the ablation: the default for DAAD(+), 1 (unused) for the others."""
    return default_division(setting.size) if model in ("daad", "daad+") else 1


def plan(setting: Setting) -> list[Run]:
    """Every run of the study, in the order of the module docstring; shared cells listed once."""
    div, data = default_division(setting.size), setting.dataset
    readings = sorted(setting.readings, key=lambda r: r != DEFAULT_READING)  # the default first

    def cells(s: int) -> list[list[Run]]:
        return [[Run(data, "daad", div, s), Run(data, "daad+", div, s, reading=readings[0])],
                [Run(data, "daad+", div, s, reading=r) for r in readings[1:]],
                [Run(data, m, 1, s) for m in ABLATION if m not in ("daad", "daad+")]
                + [Run(data, "daad", r, s) for r in block_divisions(setting.size) if r != div]]

    runs = [run for group in cells(0) for run in group] if setting.seeds else []
    for group in range(3):
        runs += [run for s in range(1, setting.seeds) for run in cells(s)[group]]
    mnist_div = default_division(setting.mnist_size)
    runs += [Run("mnist", "daad", mnist_div, s, digit) for digit in setting.digits
             for s in range(setting.seeds)]
    return runs
