"""Inference and scoring: the one scorer (:mod:`.scorer`) and its calibration (:mod:`.calibration`),
scoring a data set and its metrics (:mod:`.scores`, :mod:`.metrics`), figures (:mod:`.plots`),
evaluation (:mod:`.evaluation`), the Python API that predicts images (:mod:`.inferencer`:
:class:`Detector`) and the files of prediction (:mod:`.prediction`), and the exportable scoring
graph (:mod:`.graph`)."""
from .scorer import DEFAULT_IMAGE_SCORE, IMAGE_SCORES, ImageScores, Scorer, default_sigma
from .run_scoring import RunScoring
from .scores import ScoreSet, collect_scores, compute_metrics
from .inferencer import Detector, Prediction, Predictions

__all__ = ["DEFAULT_IMAGE_SCORE", "IMAGE_SCORES", "Detector", "ImageScores", "Prediction", "Predictions", "RunScoring",
           "ScoreSet", "Scorer", "collect_scores", "compute_metrics", "default_sigma"]
