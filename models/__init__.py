"""models: the DAAD detector (Hou et al., ICCV 2021) and its baselines, built on ``daad_ext``.

Rooms by job, each importing only from the rooms before it:

* :mod:`models.data`: the data layouts (one module each) and image files;
* :mod:`models.networks`: the plain networks, their settings and losses;
* :mod:`models.training`: the run's settings, the training step and loop, checkpoints;
* :mod:`models.inference`: the one scorer and its calibration, metrics, evaluation, the Python API
  that predicts images (:class:`Detector`), the exported graph;
* :mod:`models.study`: the reproduction study;
* the commands, thin layers over those: ``python -m models.train`` / ``evaluate`` / ``predict`` /
  ``export`` / ``calibrate`` / ``reproduce`` (installed as ``daad-train`` ...).

See docs/MODELS.md.

Example:
    >>> import torch
    >>> from models import AnomalyDetector, ModelConfig
    >>> net = AnomalyDetector(ModelConfig(model="daad", size=32, width=4, division=(2, 2, 1))).eval()
    >>> net.score(torch.zeros(1, 3, 32, 32)).rec.shape
    torch.Size([1])
"""
from .data import build_dataset
from .inference import Detector, Prediction, Scorer, collect_scores, compute_metrics
from .networks import MODEL_NAMES, AnomalyDetector, Discriminator, Generator, ModelConfig, fit_mean_image
from .training import TrainConfig, Trainer, load_detector

__all__ = ["MODEL_NAMES", "AnomalyDetector", "Detector", "Discriminator", "Generator", "ModelConfig", "Prediction",
           "Scorer", "TrainConfig", "Trainer", "build_dataset", "collect_scores", "compute_metrics", "fit_mean_image",
           "load_detector"]
