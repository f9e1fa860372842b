"""`Logger`: the base of experiment loggers (TensorBoard, CSV, W&B, MLflow).

The base owns the mechanics every logger shares, so a concrete logger only writes:

- process 0 only: other processes never open a writer or touch the disk;
- the experiment opens when training starts (the first `on_train_epoch_start`, after every
  callback's fit-start checks passed, so a misconfigured fit leaves no dangling run), and the
  hyperparameters (`Engine.hparams`: the engine's configuration and the module's constructor
  arguments) are logged then, once per run;
- metrics from `on_log` are buffered and written at the next step's `on_train_batch_end`,
  when the step after the metric read is already running (right after a read the device would
  wait for the host), or at the end of a validation, epoch or fit; metrics of one step are
  written together; a logger whose writes are costly sets `write_interval_s` (MLflow) to
  write what gathered at most that often;
- resume: `state_dict()` holds the buffer and what the logger needs to continue its run (run
  id, directory); on resume `open` learns the step after which earlier output is replaced;
- `finalize("success")` after the fit (after the final checkpoint, so `log_checkpoint` can
  still run), `finalize("failed")` when the fit raised, `"interrupted"` on preemption or
  Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from typing import TYPE_CHECKING, Any

from meshfit.engine.checkpoint.preemption import Preempted
from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

STATUSES = ("success", "failed", "interrupted")


def next_version_dir(root: str) -> str:
    """`root/version_N` (absolute) with N one past the largest existing version."""
    versions = [
        int(m.group(1))
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if (m := re.fullmatch(r"version_(\d+)", name))
    ]
    return os.path.abspath(os.path.join(root, f"version_{max(versions, default=-1) + 1}"))


def require(module: str, logger: str, extra: str) -> None:
    """A clear error at construction when an optional dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{logger} needs the `{module}` package, which is not installed. Install it with "
            f"`pip install 'meshfit[{extra}]'` (or `pip install {module}`)."
        )


def exception_status(exception: BaseException) -> str:
    return "interrupted" if isinstance(exception, Preempted | KeyboardInterrupt) else "failed"


class Logger(Callback):
    """Base class: subclasses implement `open`, `log_metrics`, `log_hyperparams`, `finalize`
    and optionally `log_checkpoint`; they extend `state_dict`/`load_state_dict` via `super()`.

    `save_dir` is where the logger writes (its root, or the tracking URI), `log_dir` this run's
    own directory; both are known once the run is open.
    """

    observes_only = True  # writing logs never steers the run
    #: ModelCheckpoint calls `log_checkpoint(path)` after each committed save when True.
    log_checkpoints: bool = False
    #: Write buffered logs at most this often, in seconds (0: at the first chance after each
    #: log). The buffer is part of `state_dict`, so a checkpoint keeps what was not written.
    write_interval_s: float = 0.0

    def __init__(self) -> None:
        self.save_dir: str | None = None
        self.log_dir: str | None = None
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._open = False
        self._restored = False
        self._hparams_logged = False
        self._last_write = -float("inf")

    # ------------------------------------------------------------------ what subclasses write
    def open(self, engine: Engine, resume_step: int | None) -> None:
        """Create the writer / run on process 0. `resume_step` is None for a new run; on a
        resume, anything this run logged at a later step is replaced by what follows."""
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Write one step's metrics (Python floats)."""
        raise NotImplementedError

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Write the run's hyperparameters (plain values: numbers, strings, lists, dicts)."""
        raise NotImplementedError

    def log_checkpoint(self, path: str) -> None:
        """Record a committed checkpoint directory (only called when `log_checkpoints`)."""

    def finalize(self, status: str) -> None:
        """Close the run: `status` is "success", "failed" or "interrupted"."""

    # ------------------------------------------------------------------ shared mechanics
    @property
    def is_open(self) -> bool:
        return self._open

    def on_train_epoch_start(self, engine: Engine) -> None:
        if self._open or not engine.is_global_zero:
            return
        resume_step = None
        if self._restored:  # continue the run the checkpoint names
            resume_step = engine.global_step
            if self._pending:  # steps logged but not yet written when the checkpoint was taken
                resume_step = min(resume_step, self._pending[0][0] - 1)
        else:  # a new run, even if this object logged an earlier fit
            self._pending, self._hparams_logged, self.log_dir = [], False, None
        self._restored = False
        self.open(engine, resume_step)
        self._open = True
        if not self._hparams_logged:
            self.log_hyperparams(engine.hparams)
            self._hparams_logged = True

    def on_log(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self._open:
            self._pending.append((engine.global_step, dict(metrics)))

    def on_train_dispatch_end(self, engine: Engine, steps: int) -> None:
        if self._pending and self._pending[-1][0] < engine.global_step and self._write_due():
            self.flush()  # the dispatch after the log is running: the host has time

    def on_validation_end(self, engine: Engine) -> None:
        if self._write_due():
            self.flush()

    def on_train_epoch_end(self, engine: Engine) -> None:
        if self._write_due():
            self.flush()

    def _write_due(self) -> bool:
        return time.monotonic() - self._last_write >= self.write_interval_s

    def on_fit_end(self, engine: Engine) -> None:
        self.flush()

    def on_exception(self, engine: Engine, exception: BaseException) -> None:
        self._close(exception_status(exception))

    def teardown(self, engine: Engine) -> None:
        self._close("success")

    def flush(self) -> None:
        """Write the buffered metrics, merged per step."""
        if not self._open or not self._pending:
            return
        pending, self._pending = self._pending, []
        self._last_write = time.monotonic()
        rows: list[tuple[int, dict[str, float]]] = []
        for step, metrics in pending:
            if rows and rows[-1][0] == step:
                rows[-1][1].update(metrics)
            else:
                rows.append((step, dict(metrics)))
        self.write_rows(rows)

    def write_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Write buffered (step, metrics) rows, one per step; a logger that can send many at
        once overrides it."""
        for step, metrics in rows:
            self.log_metrics(metrics, step)

    def _close(self, status: str) -> None:
        if self._open:
            self.flush()
            self._open = False
            self.finalize(status)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        if not self._open and not self._hparams_logged:
            return {}
        return {
            "pending": [[step, metrics] for step, metrics in self._pending],
            "hparams_logged": self._hparams_logged,
            "log_dir": self.log_dir,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._restored = True
        self._pending = [(int(step), dict(metrics)) for step, metrics in state.get("pending", [])]
        self._hparams_logged = bool(state.get("hparams_logged", False))
        self.log_dir = state.get("log_dir")


def resolve_loggers(logger: Any) -> list[Logger] | None:
    """`Engine(logger=...)` as a list of loggers; None for True (the default logger)."""
    if logger is True:
        return None
    if logger is False or logger is None:
        return []
    items = [logger] if isinstance(logger, Callback) else logger
    if not isinstance(items, list | tuple) or not all(isinstance(x, Logger) for x in items):
        got = (
            type(logger).__name__
            if not isinstance(logger, list | tuple)
            else [type(x).__name__ for x in logger]
        )
        raise TypeError(
            f"Engine(logger=...) takes True, False, a Logger or a list of Loggers; got {got}. "
            "Use e.g. logger=[TensorBoardLogger(), CSVLogger()] (from meshfit.callbacks); "
            "pass other callbacks with callbacks=[...]."
        )
    return list(items)
