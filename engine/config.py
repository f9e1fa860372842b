"""`EngineConfig`: every `Engine` argument, checked once, frozen (the CLI can reuse the checks).

Checks happen at construction, before anything is compiled: each error says what was given,
what is expected, and how to fix it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from meshfit.engine import limits
from meshfit.engine.hooks import Callback
from meshfit.engine.step.build import PRECISIONS
from meshfit.strategies import Strategy, available_strategies

NAN_GUARD_MODES = ("error", "warn", False)


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclass(frozen=True)
class EngineConfig:
    """The run's configuration (see `Engine` for what each field means)."""

    strategy: str | Strategy = "auto"
    devices: int | Sequence[Any] | None = None
    max_epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 32
    callbacks: tuple[Callback, ...] = ()
    seed: int = 0
    log_every_n_steps: int = 50
    val_every_n_steps: int | None = None
    default_root_dir: str = "./runs"
    enable_progress_bar: bool = True
    logger: bool | Callback | Sequence[Callback] = True  # Loggers (meshfit.callbacks.Logger)
    precision: str = "fp32"
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    max_in_flight: int | None = None
    nan_guard: str | bool = "error"
    enable_model_summary: bool = True
    data_workers: int = 0
    compilation_cache_dir: str | os.PathLike | bool | None = None
    num_sanity_val_steps: int = 2
    steps_per_dispatch: int | str = "auto"
    data_on_device: bool | str = "auto"
    fast_dev_run: bool | int = False
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    overfit_batches: int | float = 0
    max_time: str | datetime.timedelta | dict[str, float] | None = None
    check_val_every_n_epoch: int | None = 1

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("callbacks", tuple(self.callbacks or ()))
        set_("default_root_dir", os.fspath(self.default_root_dir))
        self._check_strategy()
        fast_dev = limits.fast_dev_batches(self.fast_dev_run)
        for name, value in (limits.fast_dev_overrides(fast_dev) if fast_dev else {}).items():
            set_(name, value)  # Lightning's fast_dev_run: these settings are replaced
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError(
                "Engine needs a stopping point: both max_epochs and max_steps are unset. "
                "Pass max_epochs=N (passes over the data) or max_steps=N (optimizer updates)."
            )
        for name in ("max_epochs", "max_steps", "val_every_n_steps", "max_in_flight"):
            _positive_int(name, getattr(self, name), optional=True)
        for name in ("batch_size", "log_every_n_steps"):
            _positive_int(name, getattr(self, name))
        n = self.num_sanity_val_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                f"num_sanity_val_steps must be a non-negative integer (0 turns the check off), "
                f"got {n!r}."
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision={self.precision!r} is not supported; use one of {sorted(PRECISIONS)}."
            )
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm={self.gradient_clip_algorithm!r}; use 'norm' (global "
                "norm) or 'value'."
            )
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0, got {self.gradient_clip_val!r}.")
        if self.nan_guard not in NAN_GUARD_MODES and self.nan_guard is not None:
            raise ValueError(
                f"nan_guard={self.nan_guard!r} is not supported; use 'error' (stop at a "
                "non-finite loss), 'warn' (skip such steps and warn) or False (no check)."
            )
        if (
            isinstance(self.data_workers, bool)
            or not isinstance(self.data_workers, int)
            or (self.data_workers < 0)
        ):
            raise ValueError(
                f"data_workers must be an integer >= 0 (0: read in this process), got "
                f"{self.data_workers!r}."
            )
        spd = self.steps_per_dispatch
        if spd != "auto" and (isinstance(spd, bool) or not isinstance(spd, int) or spd < 1):
            raise ValueError(
                f"steps_per_dispatch={spd!r}: use 'auto' (as many steps per compiled call as "
                "the cadences allow) or a positive integer (1: one step per dispatch)."
            )
        if self.data_on_device not in ("auto", True, False):
            raise ValueError(
                f"data_on_device={self.data_on_device!r}: use 'auto' (NumPy training data "
                "within the budget goes to the device once), True or False."
            )
        limits.check_batch_limit("limit_train_batches", self.limit_train_batches, False)
        limits.check_batch_limit("limit_val_batches", self.limit_val_batches, True)
        limits.check_overfit_batches(self.overfit_batches)
        limits.max_time_delta(self.max_time)
        limits.check_val_epochs(self.check_val_every_n_epoch, self.val_every_n_steps)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}.")

    def _check_strategy(self) -> None:
        if isinstance(self.strategy, str) and self.strategy not in available_strategies():
            raise ValueError(
                f"Unknown strategy {self.strategy!r}. Valid names: "
                f"{', '.join(available_strategies())}; or pass a Strategy object, e.g. "
                "Engine(strategy=DataParallel())."
            )
        if not isinstance(self.strategy, str | Strategy):
            raise TypeError(
                f"strategy must be a name or a Strategy, got {type(self.strategy).__name__}."
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every configuration field (each one an `Engine` argument)."""
        return tuple(f.name for f in fields(cls))
