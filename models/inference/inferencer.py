"""The detector as a Python API: load a checkpoint once, then predict images of any size.

:meth:`Detector.predict` takes a path, a folder, a glob, a PIL image, an array or a tensor batch
(:mod:`.inputs`) and returns one :class:`Prediction` per image, as anomalib's inferencers return
an ``ImageResult``: ``pred_score`` and ``anomaly_map`` normalised by the checkpoint's calibration
(:mod:`.calibration`) so that 0.5 is the boundary, ``pred_label`` and ``pred_mask`` decided there.
The map is resized back to the image's own height and width. Files that cannot be read are
listed in ``failures`` of the result, by name, and the other images are scored; only when no
image at all could be read does it raise.

The scoring runs in an :class:`Engine`: decoded images (uint8, each its own size) -> raw anomaly
maps at the model's size and calibrated scores. :class:`TorchEngine` runs a checkpoint in
PyTorch; :class:`RuntimeEngine` an exported graph (``models.export``: ONNX Runtime, OpenVINO or
``torch.export``), which resizes and scales the images inside the graph.

Example:
    >>> from models import Detector
    >>> detector = Detector.load("runs/hazelnut/checkpoint.pt", device="cpu")  # doctest: +SKIP
    >>> deployed = Detector.load("runs/hazelnut/openvino")  # an export folder  # doctest: +SKIP
    >>> results = detector.predict("shots/*.png")                              # doctest: +SKIP
    >>> [(r.name, round(r.pred_score, 3), r.label) for r in results]           # doctest: +SKIP
    [('shots/000.png', 0.312, 'normal'), ('shots/001.png', 0.871, 'anomalous')]
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import as_chw, prepare
from ..data.images import BadImageError, PathLike
from ..networks.acceleration import FAST_INFERENCE, PLAIN, SpeedOptions, fast_score, has_native_bf16, inference_model
from ..training import load_detector
from ..training.distributed import resolve_device
from .inputs import ImageInput, ImageSource, expand
from .runtimes import RUNTIMES, Runtime, export_info, load_runtime
from .scorer import BOUNDARY, DEFAULT_IMAGE_SCORE, Scorer

#: Graph files of an export (``models.export``): a path with one of these is loaded in its runtime.
EXPORT_SUFFIXES = (".onnx", ".xml", ".pt2")


class Engine(Protocol):
    """What scores decoded images: uint8 (H, W, ``channels``), or (H, W) for one channel, each its
    own size -> the raw anomaly maps (B, size, size) and the calibrated ``pred_score`` (B,), as the
    exported graph's outputs; ``scorer`` holds the calibration that normalises the maps."""

    channels: int
    size: int
    scorer: Scorer

    def __call__(self, pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        ...


class TorchEngine:
    """A trained detector in PyTorch (run under ``speed``: :func:`~models.networks.acceleration.fast_score`)
    and its calibrated scorer."""

    def __init__(self, model: nn.Module, scorer: Scorer, device: torch.device, channels: int, size: int,
                 speed: SpeedOptions = PLAIN) -> None:
        if not scorer.decides:
            raise ValueError("a detector needs a scorer whose calibration holds the decision thresholds")
        self.model, self.scorer, self.device, self.speed = model, scorer, device, speed
        self.channels, self.size = channels, size

    @torch.no_grad()
    def __call__(self, pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        images = torch.stack([prepare(as_chw(p), self.size) for p in pixels]).to(self.device)
        s = fast_score(self.model, images, self.speed, ali_reduction=self.scorer.ali_reduction,
                       anomaly_map=self.scorer.anomaly_map)
        maps = s.error_map.cpu().numpy()
        return maps, self.scorer.score(maps, None if s.feat is None else s.feat.cpu().numpy())


class RuntimeEngine:
    """An exported detector in its runtime (:func:`~models.inference.runtimes.load_runtime`), with
    the scorer its ``detector.json`` describes (the calibration the graph applies)."""

    def __init__(self, runtime: Runtime) -> None:
        info = runtime.info
        self.runtime, self.channels, self.size = runtime, info["in_channels"], info["size"]
        self.scorer = Scorer(gamma=info["gamma"], image_score=info["image_score"], sigma=info["sigma"],
                             ali_reduction=info["ali_reduction"], anomaly_map=info["anomaly_map"],
                             calibration=info["calibration"])

    def __call__(self, pixels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        # the graph takes a batch of one height and width: consecutive images of one shape together
        parts = [self.runtime.run(np.stack([p.reshape(*p.shape[:2], self.channels) for p in same]))
                 for _, group in itertools.groupby(pixels, key=lambda p: p.shape)
                 for same in [list(group)]]
        return np.concatenate([m for m, _ in parts]), np.concatenate([s for _, s in parts])


@dataclass
class Prediction:
    """One image's result (anomalib's ``ImageResult``): the image as read, its normalised score and
    map (0.5 the boundary) and the decisions on them."""

    name: str
    #: The calibrated image score in [0, 1]; anomalous at or above 0.5.
    pred_score: float
    #: True: anomalous.
    pred_label: bool
    #: (H, W) float in [0, 1] at the image's own resolution; a pixel is anomalous at or above 0.5.
    anomaly_map: np.ndarray
    #: (H, W) bool: ``anomaly_map >= 0.5``.
    pred_mask: np.ndarray
    #: (S, S) the model's raw anomaly map at its input size, before normalising and resizing.
    raw_map: np.ndarray
    #: uint8 (H, W, 3), or (H, W) for a grayscale model, as read.
    image: np.ndarray

    @property
    def label(self) -> str:
        return "anomalous" if self.pred_label else "normal"


class Predictions(list):
    """The :class:`Prediction` of every image read, in order; ``failures`` lists the (name, reason)
    of every image that could not be read."""

    def __init__(self, predictions: Sequence[Prediction], failures: Sequence[tuple[str, str]]) -> None:
        super().__init__(predictions)
        self.failures = list(failures)


def resize_map(raw_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (S, S) map resized bilinearly to (height, width)."""
    x = torch.from_numpy(np.asarray(raw_map, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


class Detector:
    """A trained detector that predicts images (see the module docstring); ``batch`` images are
    scored at a time."""

    def __init__(self, engine: Engine, batch: int = 16) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.engine, self.batch = engine, batch

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "auto",
             image_score: Optional[str] = None, fast: bool = True, batch: int = 16) -> "Detector":
        """The detector of a checkpoint of ``models.train``, with its stored calibration, on
        ``device`` (auto, cpu, cuda, cuda:K), or of a folder (or graph file) of ``models.export``
        in its runtime on the CPU. ``image_score``: R of the score (default: max; an export's is
        the one it was exported with). ``fast``: for a checkpoint
        :data:`~models.networks.acceleration.FAST_INFERENCE`, for an OpenVINO export its bf16
        precision, each where the CPU does bfloat16 in hardware; else plain float32."""
        if os.path.isdir(path) or os.path.splitext(path)[1] in EXPORT_SUFFIXES:
            _, info = export_info(os.fspath(path))
            bf16 = fast and "bf16" in RUNTIMES[info["format"]].precisions and has_native_bf16("cpu")
            runtime = load_runtime(os.fspath(path), precision="bf16" if bf16 else "fp32")
            if image_score not in (None, runtime.info["image_score"]):
                raise ValueError(f"{path} was exported with the image score {runtime.info['image_score']!r}; "
                                 f"export it again with --image-score {image_score} to score by it")
            return cls(RuntimeEngine(runtime), batch)
        dev = resolve_device(str(device))
        model, config, state = load_detector(path, dev)
        scorer = Scorer.calibrated(config, state, os.fspath(path), image_score or DEFAULT_IMAGE_SCORE)
        speed = FAST_INFERENCE if fast else PLAIN
        engine = TorchEngine(inference_model(model, speed), scorer, dev, config.model.in_channels, config.model.size,
                             speed)
        return cls(engine, batch)

    @property
    def scorer(self) -> Scorer:
        return self.engine.scorer

    def predict(self, images: Union[ImageInput, Sequence[ImageInput]]) -> Predictions:
        """One :class:`Prediction` per image read; raises :class:`~models.data.images.BadImageError`
        when none could be."""
        sources = expand(images)
        predictions: list[Prediction] = []
        failures: list[tuple[str, str]] = []
        for start in range(0, len(sources), self.batch):
            predictions += self._predict_batch(sources[start:start + self.batch], failures)
        if not predictions:
            raise BadImageError(failures, "no image could be scored")
        return Predictions(predictions, failures)

    @torch.no_grad()
    def _predict_batch(self, sources: Sequence[ImageSource], failures: list[tuple[str, str]]) -> list[Prediction]:
        read: list[tuple[str, np.ndarray]] = []
        for source in sources:
            try:
                read.append((source.name, source.read(self.engine.channels)))
            except BadImageError as e:
                failures += e.problems
        if not read:
            return []
        maps, scores = self.engine([pixels for _, pixels in read])
        return [self._prediction(name, pixels, raw, float(score))
                for (name, pixels), raw, score in zip(read, maps, scores)]

    def _prediction(self, name: str, pixels: np.ndarray, raw_map: np.ndarray, score: float) -> Prediction:
        anomaly_map = self.scorer.normalise_map(resize_map(raw_map, *pixels.shape[:2]))
        return Prediction(name, score, score >= BOUNDARY, anomaly_map, anomaly_map >= BOUNDARY, raw_map, pixels)

