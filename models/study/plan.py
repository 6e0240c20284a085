"""Which runs the study makes: its settings, the ablation, the block sizes and the MNIST digits.

At 64x64 input the memories see maps of 32, 16, 8 and 4 pixels: division 2 gives the block sizes
(16, 8, 4, 2) of the paper's division 8 at 256x256, and divisions 1, 2, 4 correspond to the
paper's 4, 8, 16.

Example:
    >>> from models.study.plan import SETTINGS, plan
    >>> len(plan(SETTINGS["quick"]))
    9
"""
from __future__ import annotations

from dataclasses import dataclass

ABLATION = ("ae", "memae", "ae+skip", "daad", "daad+")


@dataclass(frozen=True)
class Setting:
    """Sizes and budgets of one version of the study."""

    size: int            # hazelnut input size
    width: int
    epochs: int
    mnist_size: int
    mnist_width: int
    mnist_epochs: int
    digits: tuple[int, ...]
    seeds: int
    num_items: int = 500


SETTINGS = {
    "full": Setting(size=64, width=16, epochs=100, mnist_size=32, mnist_width=16, mnist_epochs=10,
                    digits=tuple(range(10)), seeds=3),
    "quick": Setting(size=64, width=8, epochs=10, mnist_size=32, mnist_width=8, mnist_epochs=2,
                     digits=(0, 1), seeds=1),
}


@dataclass(frozen=True)
class Run:
    dataset: str          # "mvtec" or "mnist"
    model: str
    division: int         # rh = rw; rc = 1
    seed: int
    normal_class: int = 0

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}-div{self.division}-class{self.normal_class}-seed{self.seed}"


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
    """Every run of the study, ablation first (shared cells are listed once)."""
    seeds = range(setting.seeds)
    div = default_division(setting.size)
    runs = [Run("mvtec", m, ablation_division(m, setting), s) for m in ABLATION for s in seeds]
    runs += [Run("mvtec", "daad", r, s) for r in block_divisions(setting.size) if r != div for s in seeds]
    mnist_div = default_division(setting.mnist_size)
    runs += [Run("mnist", "daad", mnist_div, s, digit) for digit in setting.digits for s in seeds]
    return runs
