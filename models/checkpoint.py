"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values: ``format``, ``config`` (a
:meth:`~models.config.TrainConfig.to_dict`), ``epoch``, the state of the networks and optimizers,
the per-epoch ``history`` and, after the last epoch, the ``calibration`` used by
:mod:`models.predict`.

Example:
    >>> import os, tempfile, torch
    >>> from models.checkpoint import load_checkpoint, save_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
    >>> save_checkpoint({"config": {}, "epoch": 1, "generator": {"w": torch.ones(2)}}, path)
    >>> load_checkpoint(path)["epoch"]
    1
"""
from __future__ import annotations

import os
import tempfile
from typing import IO, Any, Callable, Union

import torch

FORMAT = "daad-models/1"
REQUIRED_KEYS = ("config", "epoch", "generator")


class CheckpointError(ValueError):
    """A file that exists but is not a readable checkpoint of this package."""


def atomic_write(path: Union[str, os.PathLike], write: Callable[[IO], None], binary: bool = True) -> None:
    """Writes a file through ``write(f)`` atomically: a crash leaves the old file or the new one.

    The data goes to a temporary file in the same folder (so that ``os.replace`` is a rename
    within one file system), is flushed to disk, given the permissions a plain ``open`` would
    give, then replaces ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checkpoint(state: dict[str, Any], path: Union[str, os.PathLike]) -> None:
    """Writes ``state`` (with this format's tag) to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True``; clear errors for missing, truncated or foreign files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt bytes surface as many types (KeyError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated, corrupt or "
                              f"another format): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of models.train "
                              f"(expected format {FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    return state
