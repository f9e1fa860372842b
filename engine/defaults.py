"""What an `Engine` adds to its arguments: the devices it runs on and the default callbacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from meshfit.callbacks.checkpoint import ModelCheckpoint
from meshfit.callbacks.logger import Logger, resolve_loggers
from meshfit.callbacks.nan_guard import default_nan_guard
from meshfit.callbacks.progress import ProgressBar
from meshfit.callbacks.summary import default_model_summary
from meshfit.callbacks.tensorboard import TensorBoardLogger
from meshfit.callbacks.timer import Timer
from meshfit.engine.config import EngineConfig
from meshfit.engine.hooks import Callback


def resolve_devices(devices: int | Sequence[Any] | None) -> list[Any]:
    """`Engine(devices=...)`: all devices, the first N, or the given ones."""
    available = jax.devices()
    if devices is None:
        return available
    if isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"Engine(devices={devices}) asks for {devices} devices, but {len(available)} "
                f"{available[0].platform} device(s) are available. Use 1..{len(available)}, or "
                "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax."
            )
        return available[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("Engine(devices=[]) got an empty device list.")
    return devices


def default_callbacks(config: EngineConfig) -> list[Callback]:
    """The user's callbacks plus the defaults: timer (max_time), progress bar, logger, NaN guard,
    model summary (under fast_dev_run, without loggers and ModelCheckpoint); checkpointing
    callbacks (`run_last`) last, so they save what the others updated."""
    callbacks = list(config.callbacks)
    if config.fast_dev_run:  # Lightning's: nothing is written (config.logger is False too)
        callbacks = [cb for cb in callbacks if not isinstance(cb, Logger | ModelCheckpoint)]
    if config.max_time is not None and not any(isinstance(cb, Timer) for cb in callbacks):
        callbacks.append(Timer(config.max_time))
    if config.enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        callbacks.append(ProgressBar())
    loggers = resolve_loggers(config.logger)
    if loggers is None:  # logger=True: TensorBoard, unless loggers are among the callbacks
        if not any(isinstance(cb, Logger) for cb in callbacks):
            callbacks.append(TensorBoardLogger())
    else:
        callbacks += [lg for lg in loggers if not any(lg is cb for cb in callbacks)]
    callbacks.sort(key=lambda cb: bool(getattr(cb, "run_last", False)))
    callbacks += default_nan_guard(config.nan_guard, callbacks)
    callbacks += default_model_summary(config.enable_model_summary, callbacks)
    return callbacks
