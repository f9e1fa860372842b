"""Preemption: SIGTERM / SIGUSR1 set a flag; at a step boundary the engine checkpoints and exits.

The signal handler only sets a flag. The loop polls it after each step (a Python attribute read,
free in a single process). With several processes, the flag is OR-reduced across processes every
`sync_every` steps (the same steps everywhere), so all of them stop at the same step, save one
checkpoint together and exit with `PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from meshfit.engine.processes import distributed

#: Exit status after a preemption checkpoint: 75 is EX_TEMPFAIL ("try again later") in
#: sysexits.h. A launcher that sees 75 should requeue the job; the job resumes with
#: `fit(..., ckpt_path="last")`.
PREEMPTED_EXIT_CODE = 75
SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is complete; exits with `PREEMPTED_EXIT_CODE`."""

    def __init__(self, step: int, path: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.path = step, path

    def __str__(self) -> str:
        return f"preempted at step {self.step}; checkpoint saved in {self.path}"


class PreemptionWatcher:
    """Installs the signal handlers for one fit and answers "stop now?" at step boundaries."""

    def __init__(self, sync_every: int = 10):
        self.flag = False
        self.sync_every = sync_every
        self._multi = distributed.process_count() > 1
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag = True  # nothing else: the loop does the work at the next step boundary

    def install(self) -> PreemptionWatcher:
        """Replace SIGTERM/SIGUSR1 handlers (main thread only; elsewhere signals stay as they are)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self, global_step: int) -> bool:
        """True when every process should stop after this step."""
        if not self._multi:
            return self.flag
        if global_step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.flag, np.int32))
        return bool(np.any(flags))
