"""Training: the two-stage recipe, checkpoints and resume."""

from .config import TrainConfig
from .loop import RunResult, resume, train

__all__ = ["TrainConfig", "RunResult", "train", "resume"]
