"""The training loop (Accelerate) and the trainers built on it."""
from difflab.train.loop import TrainConfig, TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "fit"]
