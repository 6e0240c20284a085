"""models: the DAAD detector (Hou et al., ICCV 2021) and its baselines, built on ``daad_ext``.

Plain networks (:mod:`models.networks`), configured by :mod:`models.config`; the training step
(:mod:`models.trainer`), losses (:mod:`models.losses`), scores and metrics (:mod:`models.scoring`,
:mod:`models.inference`), data (:mod:`models.data`; image files: :mod:`models.images`),
checkpoints (:mod:`models.checkpoint`), the command lines ``python -m models.train`` /
``models.evaluate`` / ``models.predict``, and the reproduction study (``python -m models.reproduce``,
:mod:`models.study`).
See docs/MODELS.md.

Example:
    >>> import torch
    >>> from models import AnomalyDetector, ModelConfig
    >>> net = AnomalyDetector(ModelConfig(model="daad", size=32, width=4, division=(2, 2, 1))).eval()
    >>> net.score(torch.zeros(1, 3, 32, 32)).rec.shape
    torch.Size([1])
"""
from .config import MODEL_NAMES, ModelConfig, TrainConfig
from .networks import AnomalyDetector, Discriminator, Generator

__all__ = ["MODEL_NAMES", "AnomalyDetector", "Discriminator", "Generator", "ModelConfig", "TrainConfig"]
