"""`SaveClock`: "has `every_n_seconds` passed since the last save?", answered at the same step
on every process.

Clocks on different processes never agree exactly, and processes must save together (each
writes its shards of one checkpoint). So with several processes, process 0 decides: every
`sync_every` steps (the same steps everywhere) its answer is gathered by all of them, one
small collective. A single process reads its own clock at every step and pays nothing more.
"""

from __future__ import annotations

import time

import numpy as np
from jax.experimental import multihost_utils

from meshfit.engine.processes import distributed

#: With several processes, how often (in steps) process 0's clock is shared.
SYNC_EVERY_N_STEPS = 10


class SaveClock:
    """Time since the last save, checked at step boundaries."""

    def __init__(self, every_n_seconds: float, sync_every: int = SYNC_EVERY_N_STEPS):
        self.every_n_seconds, self.sync_every = float(every_n_seconds), sync_every
        self._multi = distributed.process_count() > 1
        self._last = time.monotonic()

    def reset(self) -> None:
        """Start counting again (at fit start and after every save)."""
        self._last = time.monotonic()

    def _elapsed(self) -> bool:
        return time.monotonic() - self._last >= self.every_n_seconds

    def due(self, global_step: int) -> bool:
        """True when a time-based save should happen after this step (on every process)."""
        if not self._multi:
            return self._elapsed()
        if global_step % self.sync_every:
            return False
        mine = np.asarray(distributed.is_main_process() and self._elapsed(), np.int32)
        return bool(multihost_utils.process_allgather(mine)[0])  # process 0's answer
