"""`EarlyStopping`: stop when a logged metric has not improved for `patience` checks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from meshfit.callbacks.checkpoint import MODES, metric_source
from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


class EarlyStopping(Callback):
    """Sets `engine.should_stop` after `patience` checks without an improvement > `min_delta`.

    A validation metric is checked after every validation pass; a training metric at the end of
    every epoch. Its state (best value, wait count) is saved in checkpoints. Metrics are reduced
    over the global batch inside the compiled step, so every process reads the same value and
    takes the same decision: in multi-process runs all processes stop at the same step.
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch

    def __init__(self, monitor: str, patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"EarlyStopping(monitor={monitor!r}): name a logged metric.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience!r}): use a positive int.")
        if mode not in MODES:
            raise ValueError(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        if not min_delta >= 0:
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}): use a value >= 0.")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, patience, mode, min_delta
        self._source: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.wait_count = 0
        self.stopped_step: int | None = None

    def setup(self, engine: Engine) -> None:
        self._reset()  # a checkpoint restored after setup brings the saved state back

    def on_fit_start(self, engine: Engine) -> None:
        self._source = metric_source(engine, self.monitor, "EarlyStopping")

    def on_validation_end(self, engine: Engine) -> None:
        if self._source == "val":
            self._check(engine)

    def on_train_epoch_end(self, engine: Engine) -> None:
        if self._source == "train":
            self._check(engine)

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _check(self, engine: Engine) -> None:
        value = engine.callback_metrics.get(self.monitor)
        if value is None:
            return
        if self.improved(value):
            self.best, self.wait_count = float(value), 0
        else:
            self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopped_step = engine.global_step
            engine.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait_count": self.wait_count, "stopped_step": self.stopped_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.wait_count = int(state.get("wait_count", 0))
        self.stopped_step = state.get("stopped_step")
