"""Inference and scoring: the one scorer (:mod:`.scorer`), scoring a data set and its metrics
(:mod:`.scores`, :mod:`.metrics`), figures (:mod:`.plots`), evaluation and prediction
(:mod:`.evaluation`, :mod:`.prediction`) and the exportable scoring graph (:mod:`.graph`)."""
from .scorer import DEFAULT_IMAGE_SCORE, IMAGE_SCORES, ImageScores, Scorer, default_sigma
from .run_scoring import RunScoring
from .scores import ScoreSet, collect_scores, compute_metrics

__all__ = ["DEFAULT_IMAGE_SCORE", "IMAGE_SCORES", "ImageScores", "RunScoring", "ScoreSet", "Scorer", "collect_scores", "compute_metrics",
           "default_sigma"]
