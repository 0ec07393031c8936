"""The training loop (Accelerate) and the trainers built on it."""
from .loop import TrainConfig, TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "fit"]
