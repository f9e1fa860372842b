"""meshfit: a Lightning-style, callback-based training engine for JAX."""

from meshfit.engine import Engine
from meshfit.module import TrainModule
from meshfit.state import TrainState

__all__ = ["Engine", "TrainModule", "TrainState"]
__version__ = "0.1.0"
