"""Host-side timing of the fit loop: where the wall time goes (step, data, callbacks, validation).

The engine marks phase changes with one `perf_counter` call each; nothing here touches the
device. Time is exclusive: a callback running inside validation counts as "callbacks" only.
"""

from __future__ import annotations

import time

#: Phases, in report order. "step": dispatching the compiled step and waiting for the device
#: (bounded in-flight queue, metric reads at the log cadence); "data": waiting for the next
#: batch (loading, host slicing, transfer); "callbacks": inside host hooks; "validation": the
#: validation passes apart from their hooks.
PHASES = ("step", "data", "callbacks", "validation")


class PhaseTimer:
    """Accumulates wall time per phase. `switch(name)` moves the loop to a new phase;
    `phase(name)` is a nestable context that returns to the previous phase on exit."""

    def __init__(self, enabled: bool = False) -> None:
        #: Off by default: the perf_counter calls cost a few percent of a small model's step.
        #: The Profiler callback turns it on; so can `engine.timings.enabled = True`.
        self.enabled = enabled
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._current: str | None = None
        self._last = 0.0

    def start(self, phase: str = "data") -> None:
        """Begin timing (clears previous totals); the loop starts out waiting for data."""
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        if self.enabled:
            self._current, self._last = phase, time.perf_counter()

    def stop(self) -> None:
        """Close the current phase; later `switch`/`phase` calls are no-ops until `start`."""
        self.switch(None)

    def begin_step(self, steps: int = 1) -> None:
        """Enter the "step" phase for `steps` more training steps (one dispatch)."""
        if self._current is not None:
            self.steps += steps
            self.switch("step")

    @property
    def running(self) -> bool:
        return self._current is not None

    def switch(self, phase: str | None) -> str | None:
        """Charge the time since the last change to the current phase, then enter `phase`.
        Returns the phase that was left (so a caller can switch back)."""
        previous = self._current
        if previous is not None:
            now = time.perf_counter()
            self.totals[previous] = self.totals.get(previous, 0.0) + now - self._last
            self._last = now
            self._current = phase
        return previous

    def phase(self, name: str) -> _Phase:
        """`with timer.phase("callbacks"): ...` — charge the block to `name`, then resume."""
        return _Phase(self, name)

    @property
    def total(self) -> float:
        return sum(self.totals.values())

    def summary(self) -> str:
        """A few aligned lines: seconds and share of the loop's wall time per phase."""
        total = self.total
        lines = [f"Fit loop: {total:.3f} s over {self.steps} steps"]
        if self.steps:
            lines[0] += f" ({1e3 * total / self.steps:.3f} ms/step)"
        for name, seconds in self.totals.items():
            share = 100.0 * seconds / total if total > 0 else 0.0
            lines.append(f"  {name:<11} {seconds:9.3f} s  {share:5.1f}%")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase plus `total` and `steps` (e.g. for logging or a JSON report)."""
        return {**self.totals, "total": self.total, "steps": float(self.steps)}


class _Phase:
    """Context manager for `PhaseTimer.phase` (a class: cheaper than a generator per call)."""

    __slots__ = ("_name", "_previous", "_timer")

    def __init__(self, timer: PhaseTimer, name: str):
        self._timer, self._name, self._previous = timer, name, None

    def __enter__(self) -> None:
        self._previous = self._timer.switch(self._name)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            self._timer.switch(self._previous)
