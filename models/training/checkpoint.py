"""Checkpoints: written atomically, verified by a checksum, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values: ``format``, ``config`` (a
:meth:`~models.training.TrainConfig.to_dict`), ``epoch``, the state of the networks and optimizers,
the per-epoch ``history``, after the last epoch the ``calibration`` of the scores (:mod:`models.inference.scorer`),
and ``checksum``: a SHA-256 of everything else, computed when it is saved.

Loading refuses, with a :class:`CheckpointError` naming the file: a file that is not a readable
checkpoint; one whose contents fail the checksum (flipped bytes, an edited setting); one whose
settings do not fit its weights or that lacks a network's weights (:func:`load_into`); one with
NaN or infinite weights (:func:`restore_networks`). A checkpoint written before checksums existed
loads with a :class:`UnverifiedCheckpointWarning`.

Saves go through :func:`~models.training.atomic.atomic_write`: a crash leaves the old file or the new one,
and the temporary files of killed earlier saves are removed.

Example:
    >>> import os, tempfile, torch
    >>> from models.training.checkpoint import load_checkpoint, save_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
    >>> save_checkpoint({"config": {}, "epoch": 1, "generator": {"w": torch.ones(2)}}, path)
    >>> load_checkpoint(path)["epoch"]
    1
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Union

import torch

from ..networks import AnomalyDetector, TiledDetector
from .atomic import PathLike, atomic_write
from .config import TrainConfig

FORMAT = "daad-models/1"
REQUIRED_KEYS = ("config", "epoch", "generator")


class CheckpointError(ValueError):
    """A file that exists but is not a sound checkpoint of this package."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without a checksum (written by an older version): its contents are not verified."""


def checksum(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: tensors by dtype, shape and bytes, other values by repr.

    Dicts are walked in their order, which ``torch.save`` and ``torch.load`` keep.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {t.dtype} {tuple(value.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"list {len(value)};".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    feed(state)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], path: PathLike) -> None:
    """Writes ``state`` (with this format's tag and its checksum) to ``path`` atomically."""
    tagged = {"format": FORMAT, **state}
    tagged["checksum"] = checksum(tagged)
    atomic_write(path, lambda f: torch.save(tagged, f))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Loads a checkpoint with ``weights_only=True`` and verifies its checksum; clear errors otherwise."""
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
    stored = state.pop("checksum", None)
    if stored is None:
        warnings.warn(f"{path} has no checksum (written before checkpoints had one): its contents "
                      "cannot be verified", UnverifiedCheckpointWarning)
    elif stored != checksum(state):
        raise CheckpointError(f"{path} fails its checksum: its contents changed after it was written "
                              "(corrupted on disk or in transfer, or edited); it was not loaded")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    return state


def stored_config(state: dict[str, Any], source: str) -> TrainConfig:
    """The run's settings stored in a checkpoint; invalid ones raise a :class:`CheckpointError`."""
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} holds invalid settings: {e}") from e


def load_into(target: Any, state: dict[str, Any], key: str, source: str) -> None:
    """``target.load_state_dict(state[key])`` (a network or an optimizer), with the checkpoint named
    in the error when the entry is missing or does not fit ``target``."""
    value = state.get(key)
    if not isinstance(value, dict) or not value:
        raise CheckpointError(f"{source} lacks the {key} state that its settings call for")
    try:
        target.load_state_dict(value)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{source}: its stored settings do not fit its {key} state "
                              f"({' '.join(line.strip() for line in first[:3])}); the settings were "
                              "edited or the state comes from another run") from e


def restore_networks(model: Union[AnomalyDetector, TiledDetector], state: dict[str, Any], source: str) -> None:
    """Loads a checkpoint's generator and (where ``model`` has one) discriminator weights.

    Refuses, naming ``source``, weights that are missing, do not fit the model, or hold NaN or
    infinite values (what a diverged run would have saved).
    """
    for key, network in (("generator", model.generator), ("discriminator", model.discriminator)):
        if network is None:
            continue
        load_into(network, state, key, source)
        broken = [name for name, t in network.state_dict().items()
                  if t.is_floating_point() and not torch.isfinite(t).all()]
        if broken:
            raise CheckpointError(f"{source} holds non-finite (NaN or infinite) {key} weights in "
                                  f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}: the run "
                                  "that wrote it diverged; use an earlier checkpoint or train again "
                                  "with a lower --lr")


def load_detector(path: PathLike, device: torch.device) -> tuple[Union[AnomalyDetector, TiledDetector], TrainConfig,
                                                                 dict[str, Any]]:
    """The trained detector of a checkpoint (in eval mode; a :class:`~models.networks.TiledDetector`
    for a tiled run), its settings and the checkpoint itself."""
    state = load_checkpoint(path, map_location=device)
    config = stored_config(state, os.fspath(path))
    model = config.detector().to(device)
    restore_networks(model, state, os.fspath(path))
    return model.eval(), config, state
