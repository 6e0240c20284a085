"""The console commands of ``pip install ".[models]"``: daad-train, daad-evaluate, daad-predict,
daad-export (each the ``main`` of ``python -m models.<command>``, whose result a console script
must not return as its exit status)."""
from __future__ import annotations


def train() -> None:
    from .train import main
    main()


def evaluate() -> None:
    from .evaluate import main
    main()


def predict() -> None:
    from .predict import main
    main()


def export() -> None:
    from .export import main
    main()
