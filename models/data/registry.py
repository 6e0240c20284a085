"""The data layouts by name: each layout module registers, in one place, its name, its image
channels, its own settings (a frozen dataclass whose fields are the run's config fields and the
command line's options) and how it builds a split.

Adding a layout is one new module of this package that calls :func:`register`, imported by
``models/data/__init__.py``; ``train``'s options, the run's config and :func:`build_dataset` then
know it. An option's command-line form comes from its field's metadata (:func:`option`).

Example:
    >>> from models.data import layout
    >>> layout("mnist").channels, layout("mnist").parse({"normal_class": 3})
    (1, {'normal_class': 3})
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .dataset import OneClassDataset

#: build(root, split, size, options, augment, skip_bad_images) -> the split of the data set.
Builder = Callable[[Path, str, int, Any, bool, bool], "OneClassDataset"]


def option(default: Any, help: str, type: Optional[Callable] = None, nargs: Optional[str] = None) -> Any:
    """A field of a layout's settings with its command-line form: ``--field-name`` of ``type``
    (default: the default's type), ``nargs`` "+" for a list (kept as a tuple)."""
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "nargs": nargs})


@dataclass(frozen=True)
class Layout:
    name: str
    channels: int
    #: A frozen dataclass of the layout's settings, each field made by :func:`option`; its
    #: ``__post_init__`` checks them.
    options: type
    build: Builder
    #: One line for ``--help``: the folders the layout reads.
    summary: str

    def parse(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` checked and completed with the defaults, as plain values (what a config stores)."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{', '.join(flag(k) for k in unknown)} do{'es' if len(unknown) == 1 else ''} not "
                             f"apply to the {self.name} data layout (its options: "
                             f"{', '.join(flag(k) for k in sorted(known)) or 'none'})")
        return dataclasses.asdict(self.options(**values))


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    if layout.name in LAYOUTS:
        raise ValueError(f"data layout {layout.name!r} is registered twice")
    LAYOUTS[layout.name] = layout
    return layout


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {tuple(LAYOUTS)}")
    return LAYOUTS[name]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every layout option by name: its field and the layouts that take it (a field shared by
    layouts, as MNIST's and CIFAR-10's ``normal_class``, must be declared the same way)."""
    found: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for entry in LAYOUTS.values():
        for f in dataclasses.fields(entry.options):
            if f.name in found:
                first = found[f.name][0]
                if (first.default, first.metadata) != (f.default, f.metadata):
                    raise ValueError(f"layout option {f.name!r} is declared differently by "
                                     f"{found[f.name][1]} and {entry.name}")
                found[f.name][1].append(entry.name)
            else:
                found[f.name] = (f, [entry.name])
    return found


def add_options(group: argparse._ArgumentGroup, default: str) -> None:
    """Adds ``--dataset`` (the layouts registered now) and every layout's options to ``group``,
    each once, its help naming the layouts it serves. Unset options stay unset (the parser's
    ``argument_default`` is ``SUPPRESS``)."""
    group.add_argument("--dataset", choices=tuple(LAYOUTS), help=f"data layout (default: {default}): "
                       + "; ".join(f"{entry.name}: {entry.summary}" for entry in LAYOUTS.values()))
    for name, (f, users) in option_fields().items():
        kind = f.metadata["type"] or type(f.default)
        shown = "" if f.default in (None, ()) else f" (default: {f.default})"
        group.add_argument(flag(name), type=kind, nargs=f.metadata["nargs"],
                           help=f"{'/'.join(users)}: {f.metadata['help']}{shown}")
