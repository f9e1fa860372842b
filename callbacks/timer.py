"""`Timer`: stop a fit at a step boundary once its wall time exceeds a duration
(`Engine(max_time=...)` adds one; Lightning's `Timer`)."""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Any

from meshfit.engine.checkpoint.clock import SYNC_EVERY_N_STEPS, SaveClock
from meshfit.engine.hooks import Callback
from meshfit.engine.limits import max_time_delta
from meshfit.engine.processes import distributed

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


class Timer(Callback):
    """Sets `engine.should_stop` at the first step boundary after `duration` of training wall
    time, counted from `on_fit_start` (as Lightning's, from the start of training: after the
    first step is compiled, before the sanity check; later compiles and validation count).

    `duration`: "DD:HH:MM:SS", a `datetime.timedelta` or a dict of days / hours / minutes /
    seconds. With several processes, process 0's clock decides and is shared every 10 steps
    (`SaveClock`), so all of them stop at the same step. A `ModelCheckpoint` (with `save_last`,
    the default) then saves that step at the end of fit.

    Under fused dispatch the next check step bounds K: from the measured time per step, a
    dispatch never runs past the moment the limit is expected to pass.
    """

    fusion_safe = True  # the check reads only the counters and the clock

    def __init__(self, duration: str | datetime.timedelta | dict[str, float]):
        delta = max_time_delta(duration)
        if delta is None:
            raise ValueError("Timer(duration=None): give a duration, e.g. '00:01:00:00'.")
        self.duration = delta
        self.stopped_step: int | None = None  # where the limit stopped the last fit
        self.stopped_after: float | None = None  # seconds of training when it stopped
        self._clock: SaveClock | None = None
        self._t0: float | None = None  # when the current fit started
        self._start: tuple[float, int] | None = None  # (time, step) of the first check
        self._step_seconds: float | None = None

    def on_fit_start(self, engine: Engine) -> None:
        self._clock = SaveClock(self.duration.total_seconds())  # counts from now
        self._t0 = time.monotonic()
        self.stopped_step = self.stopped_after = self._start = self._step_seconds = None

    def time_elapsed(self) -> float:
        """Seconds since the current (or last) fit started training (`on_fit_start`)."""
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def time_remaining(self) -> float:
        return max(0.0, self.duration.total_seconds() - self.time_elapsed())

    def next_host_step(self, engine: Engine) -> int | None:
        """With several processes: the steps where process 0's answer is shared. Alone: as far
        as the remaining time allows at the measured seconds per step (1 step until measured)."""
        step = engine.global_step
        if distributed.process_count() > 1:
            return (step // SYNC_EVERY_N_STEPS + 1) * SYNC_EVERY_N_STEPS
        if self._step_seconds is None:
            return step + 1
        return step + max(1, int(self.time_remaining() / self._step_seconds))

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = engine.global_step
        if engine.dispatch_end_step in (None, step):
            self._measure(step)
        if self._clock is not None and self._clock.due(step) and not engine.should_stop:
            engine.should_stop = True
            self.stopped_step = engine.dispatch_end_step or step  # the dispatch ends the fit
            self.stopped_after = self.time_elapsed()
            if engine.is_global_zero:
                print(
                    f"[meshfit] max_time {self.duration} reached after "
                    f"{self.stopped_after:.2f} s: stopping at step {self.stopped_step}.",
                    flush=True,
                )

    def _measure(self, step: int) -> None:
        """Host seconds per step since the first dispatch ended (that one includes compiles)."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, step)
        elif step > self._start[1]:
            self._step_seconds = (now - self._start[0]) / (step - self._start[1])
