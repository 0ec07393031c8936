"""The training loop (Accelerate), the contract every fitting function follows, and the trainers built on it."""
from difflab.train.contract import FitResult, JSONConfig, Step, StepCallback
from difflab.train.loop import TrainConfig, fit

__all__ = ["FitResult", "JSONConfig", "Step", "StepCallback", "TrainConfig", "fit"]
