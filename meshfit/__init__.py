"""meshfit: a Lightning-style, callback-based training engine for JAX.

This package only re-exports the public names; the code lives in `meshfit.engine`,
`meshfit.callbacks` and `meshfit.strategies`."""

from meshfit.callbacks.ema import EMA
from meshfit.engine.batch_size import BatchSizeEstimate, find_batch_size
from meshfit.engine.checkpoint.format import CheckpointError
from meshfit.engine.checkpoint.preemption import PREEMPTED_EXIT_CODE, Preempted
from meshfit.engine.checkpoint.weights import load_weights, save_weights
from meshfit.engine.data import PerProcess
from meshfit.engine.datamodule import DataModule
from meshfit.engine.engine import Engine
from meshfit.engine.hardware import hardware_info, hardware_report
from meshfit.engine.module import TrainModule
from meshfit.engine.stack import Stack
from meshfit.engine.state import TrainState

__all__ = [
    "EMA",
    "PREEMPTED_EXIT_CODE",
    "BatchSizeEstimate",
    "CheckpointError",
    "DataModule",
    "Engine",
    "PerProcess",
    "Preempted",
    "Stack",
    "TrainModule",
    "TrainState",
    "find_batch_size",
    "hardware_info",
    "hardware_report",
    "load_weights",
    "save_weights",
]
__version__ = "0.1.0"
