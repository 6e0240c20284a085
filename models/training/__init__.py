"""Training: the run's settings (:mod:`.config`), one optimisation step (:mod:`.trainer`), the
epochs of a run (:mod:`.loop`), checkpoints (:mod:`.checkpoint`) written atomically
(:mod:`.atomic`), data-parallel processes (:mod:`.distributed`) and mixed precision (:mod:`.amp`)."""
from .checkpoint import CheckpointError, load_checkpoint, load_detector, save_checkpoint
from .config import DEFAULT_READING, LOSS_READINGS, TrainConfig
from .loop import CHECKPOINT, Resume, RunHooks, RunOptions, train
from .trainer import DivergenceError, Trainer

__all__ = ["CHECKPOINT", "DEFAULT_READING", "LOSS_READINGS", "CheckpointError", "DivergenceError", "Resume",
           "RunHooks", "RunOptions", "TrainConfig", "Trainer", "load_checkpoint", "load_detector", "save_checkpoint",
           "train"]
