"""Callbacks: host hooks around the loop, and in-step transforms that compose into the step."""

from meshfit.callbacks.accumulation import GradientAccumulation
from meshfit.callbacks.checkpoint import ModelCheckpoint
from meshfit.callbacks.csv_logger import CSVLogger
from meshfit.callbacks.device_stats import DeviceStatsMonitor
from meshfit.callbacks.early_stopping import EarlyStopping
from meshfit.callbacks.ema import EMA
from meshfit.callbacks.logger import Logger
from meshfit.callbacks.loss_scaling import DynamicLossScaling
from meshfit.callbacks.lr_monitor import LearningRateMonitor
from meshfit.callbacks.mlflow_logger import MLflowLogger
from meshfit.callbacks.nan_guard import NanGuard
from meshfit.callbacks.prediction_writer import PredictionWriter, read_predictions
from meshfit.callbacks.profiler import Profiler
from meshfit.callbacks.progress import ProgressBar
from meshfit.callbacks.summary import ModelSummary
from meshfit.callbacks.tensorboard import TensorBoardLogger
from meshfit.callbacks.throughput import Throughput
from meshfit.callbacks.timer import Timer
from meshfit.callbacks.wandb_logger import WandbLogger
from meshfit.engine.hooks import Callback, StepTransform, all_finite

__all__ = [
    "EMA",
    "CSVLogger",
    "Callback",
    "DeviceStatsMonitor",
    "DynamicLossScaling",
    "EarlyStopping",
    "GradientAccumulation",
    "LearningRateMonitor",
    "Logger",
    "MLflowLogger",
    "ModelCheckpoint",
    "ModelSummary",
    "NanGuard",
    "PredictionWriter",
    "Profiler",
    "ProgressBar",
    "StepTransform",
    "TensorBoardLogger",
    "Throughput",
    "Timer",
    "WandbLogger",
    "all_finite",
    "read_predictions",
]
