"""Callbacks: host hooks around the loop, and in-step transforms that compose into the step."""

from meshfit.callbacks.base import Callback, StepTransform, all_finite
from meshfit.callbacks.progress import ProgressBar
from meshfit.callbacks.tensorboard import TensorBoardLogger

__all__ = ["Callback", "ProgressBar", "StepTransform", "TensorBoardLogger", "all_finite"]
