"""meshfit: a Lightning-style, callback-based training engine for JAX."""

from meshfit.batch_size import BatchSizeEstimate, find_batch_size
from meshfit.checkpoint import CheckpointError
from meshfit.data import PerProcess
from meshfit.engine import Engine
from meshfit.hardware import hardware_info, hardware_report
from meshfit.module import TrainModule
from meshfit.preemption import PREEMPTED_EXIT_CODE, Preempted
from meshfit.restore import load_weights, save_weights
from meshfit.stack import Stack
from meshfit.state import TrainState

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "BatchSizeEstimate",
    "CheckpointError",
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
