"""`Profiler`: a `jax.profiler` trace of a window of training steps, plus a host-time summary."""

from __future__ import annotations

import glob
import os
import warnings
from typing import TYPE_CHECKING, Any

import jax
from tqdm.auto import tqdm

from meshfit.callbacks.tensorboard import TensorBoardLogger
from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


def _non_negative_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Profiler({name}={value!r}): expected an integer >= {minimum}.")
    return value


class Profiler(Callback):
    """Traces steps `start_step .. start_step + num_steps - 1` (0-based: step i is the i-th
    optimizer step of the run) with `jax.profiler`, each step wrapped in a
    `StepTraceAnnotation("train", step_num=i)`, so TensorBoard's profile plugin shows one row
    per step. Nothing outside the window is traced: steps still in flight are waited for before
    the trace starts, and the window's steps are waited for before it stops.

    The trace lands in `dirpath` if given, else next to the TensorBoard scalars (the
    `TensorBoardLogger`'s version directory), else in `<default_root_dir>/profile`, in the layout
    `plugins/profile/<timestamp>/<host>.xplane.pb`. Open it with
    `tensorboard --logdir <that directory>` (Profile tab; needs `tensorboard-plugin-profile`).

    At the end of fit, process 0 prints `engine.timings.summary()`: host time in the compiled
    step (dispatch + waiting for the device), waiting for data, in callbacks and in validation.

    Args:
        start_step: first step traced (steps before it warm up: compilation, caches).
        num_steps: how many steps are traced.
        dirpath: where the trace goes (default: see above).
        all_processes: trace on every process (each into `process_<i>/`), not only process 0.
        summary: print the host timing summary at the end of fit.
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch

    def next_host_step(self, engine: Engine) -> int | None:
        """A dispatch ends where the window starts; inside it, one step per dispatch (each
        traced step has its own annotation)."""
        g = engine.global_step
        if g < self.start_step:
            return self.start_step
        return g + 1 if g < self.end_step else None

    def __init__(
        self,
        start_step: int = 10,
        num_steps: int = 5,
        dirpath: str | os.PathLike | None = None,
        all_processes: bool = False,
        summary: bool = True,
    ):
        self.start_step = _non_negative_int("start_step", start_step, 0)
        self.num_steps = _non_negative_int("num_steps", num_steps, 1)
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.all_processes, self.summary = all_processes, summary
        self.log_dir: str | None = None  # where the trace was written (set when it starts)
        self.trace_dir: str | None = None  # the plugins/profile/<timestamp> run directory
        self.traced_steps: list[int] = []
        self._active = False
        self._annotation: Any = None

    @property
    def end_step(self) -> int:
        """One past the last traced step."""
        return self.start_step + self.num_steps

    def setup(self, engine: Engine) -> None:
        engine.timings.enabled = True  # the host-side timing summary printed at fit end
        if engine.max_steps is not None and self.start_step >= engine.max_steps:
            raise ValueError(
                f"Profiler(start_step={self.start_step}) would never start: the run stops after "
                f"max_steps={engine.max_steps}. Use a start_step below {engine.max_steps}."
            )
        self.traced_steps, self.trace_dir = [], None

    def _resolve_dir(self, engine: Engine) -> str:
        root = self.dirpath
        if root is None:
            tb = [
                cb.log_dir
                for cb in engine.callbacks
                if isinstance(cb, TensorBoardLogger) and cb.log_dir
            ]
            root = tb[0] if tb else os.path.join(engine.default_root_dir, "profile")
        if self.all_processes and jax.process_count() > 1:
            root = os.path.join(root, f"process_{jax.process_index()}")
        return root

    def _wanted(self, engine: Engine) -> bool:
        in_window = self.start_step <= engine.global_step < self.end_step
        return in_window and not self.traced_steps and (self.all_processes or engine.is_global_zero)

    def on_train_batch_start(self, engine: Engine, batch: Any, batch_idx: int) -> None:
        if not self._active:
            if not self._wanted(engine):
                return
            self.log_dir = self._resolve_dir(engine)
            os.makedirs(self.log_dir, exist_ok=True)
            self._before = set(glob.glob(os.path.join(self.log_dir, "plugins", "profile", "*")))
            jax.block_until_ready(engine.state)  # earlier steps finish outside the trace
            jax.profiler.start_trace(self.log_dir)
            self._active = True
        self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=engine.global_step)
        self._annotation.__enter__()
        self.traced_steps.append(engine.global_step)

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._close_annotation()
        if self._active and engine.global_step >= self.end_step:
            self._stop(engine)

    def _close_annotation(self) -> None:
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None

    def _stop(self, engine: Engine, wait: bool = True) -> None:
        self._close_annotation()
        if wait:
            jax.block_until_ready(engine.state)  # the window's device work lands in the trace
        jax.profiler.stop_trace()
        self._active = False
        runs = set(glob.glob(os.path.join(self.log_dir, "plugins", "profile", "*"))) - self._before
        self.trace_dir = max(runs, default=None)

    def on_fit_end(self, engine: Engine) -> None:
        if self._active:  # the run ended inside the window
            self._stop(engine)
        if (
            engine.is_global_zero
            and not self.traced_steps
            and engine.global_step <= self.start_step
        ):
            warnings.warn(
                f"Profiler: the run ended at step {engine.global_step}, before start_step="
                f"{self.start_step}; no trace was captured. Lower start_step.",
                stacklevel=2,
            )
        if self.summary and engine.is_global_zero:
            lines = [engine.timings.summary()]
            if self.trace_dir:
                lines.append(
                    f"Trace of steps {self.traced_steps[0]}..{self.traced_steps[-1]} in "
                    f"{self.trace_dir} (tensorboard --logdir {self.log_dir})"
                )
            tqdm.write("\n".join(lines))

    def on_exception(self, engine: Engine, exception: BaseException) -> None:
        if self._active:
            self._stop(engine, wait=False)

    def teardown(self, engine: Engine) -> None:
        if self._active:
            self._stop(engine, wait=False)
