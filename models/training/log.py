"""A run's log: one JSON line an epoch in ``train_log.jsonl`` and, with ``--log tensorboard``, the
same numbers as TensorBoard scalars in ``tensorboard/`` beside it, by optimisation step."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from .atomic import write_bytes

#: The extra that brings TensorBoard (setup.py).
TENSORBOARD_HINT = "pip install tensorboard (or the package's extra: pip install 'daad_ext[tensorboard]')"


def numbers(record: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numeric values of a log record, nested dicts as ``outer/inner`` (TensorBoard's groups)."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, float(value)


def summary_writer_class() -> type:
    """TensorBoard's ``SummaryWriter``; a ``ValueError`` that names the package where it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from e
    return SummaryWriter


class RunLog:
    """Appends each epoch's record to ``out/train_log.jsonl``, which starts (rewritten atomically)
    from ``history``, the records of the epochs the run's checkpoint holds (none for a fresh run),
    and, with ``tensorboard``, writes its numbers as scalars to ``out/tensorboard``."""

    def __init__(self, out: str, history: list[dict[str, Any]], tensorboard: bool = False) -> None:
        self.path = os.path.join(out, "train_log.jsonl")
        self.writer = None
        if tensorboard:
            self.writer = summary_writer_class()(os.path.join(out, "tensorboard"))
        os.makedirs(out, exist_ok=True)
        write_bytes(self.path, "".join(json.dumps(record) + "\n" for record in history).encode())

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = int(record.get("step", record["epoch"]))
            for name, value in numbers({k: v for k, v in record.items() if k not in ("epoch", "step")}):
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
