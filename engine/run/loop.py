"""The loop: train steps dispatched ahead of the host, hooks, logs, validation, stopping.

Functions over the `Engine` (its counters, callbacks and state), kept apart from its setup.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import jax

from meshfit.engine.checkpoint import preemption
from meshfit.engine.run.metrics import MetricWindow

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


def fit_loop(engine: Engine, train_loader: Any, val_loader: Any) -> None:
    """Epochs of steps until max_epochs / max_steps / should_stop, from the engine's data
    position: one dispatch per step, metrics read at the log cadence, hooks in documented order."""
    window = engine._train_window
    in_flight = InFlight(in_flight_limit(engine))
    batch_hooks = bool(engine._hooks["on_train_batch_start"] or engine._hooks["on_train_batch_end"])
    step = engine._train_step
    engine.timings.start()  # phases: waiting for data until the step is dispatched
    while not _finished(engine):
        engine._call("on_train_epoch_start")
        position, engine._first_batches = engine._first_batches, None
        if position and position[:2] == (engine.current_epoch, engine.batch_idx):
            batches = position[2]
        else:
            batches = train_loader.epoch(
                engine.current_epoch, engine.batch_idx, engine._placer.rows_for
            )
        exhausted, epoch_start = True, engine.batch_idx
        on_device = engine._placer.prefetch(batches)
        for batch, _rows in on_device:
            if batch_hooks:
                engine._call("on_train_batch_start", batch, engine.batch_idx)
            engine.timings.begin_step()
            # the state as flat leaves: `engine.state` is rebuilt only if something reads it
            engine._leaves, outputs = step(engine._state_leaves(), batch)
            engine._state = None
            with engine.timings.phase("data"):
                on_device.refill()  # the next batch's transfer overlaps this step
            window.add(outputs)
            in_flight.add(outputs)
            window.settle()  # read the steps already finished, while the device runs on
            engine.timings.switch("data")
            engine.global_step += 1
            engine.batch_idx += 1
            if engine.global_step % engine.log_every_n_steps == 0:
                log_window(engine, window)
            if batch_hooks:
                engine._call("on_train_batch_end", outputs, batch, engine.batch_idx - 1)
            if (
                val_loader is not None
                and engine.val_every_n_steps
                and engine.global_step % engine.val_every_n_steps == 0
            ):
                validation_pass(engine, val_loader)
            if engine._preemption.requested(engine.global_step):
                preemption.checkpoint_and_exit(engine)  # saves, then raises Preempted (exit 75)
            if engine.should_stop or reached_max_steps(engine):
                exhausted = (
                    engine.num_training_batches is not None
                    and engine.batch_idx >= engine.num_training_batches
                )
                break
        n = engine.num_training_batches
        at_end = n is not None and epoch_start >= n  # resumed just after the epoch's last batch
        if engine.batch_idx == epoch_start and not at_end:
            raise ValueError(
                f"train_data produced no batches in epoch {engine.current_epoch}. A one-shot "
                "iterator is exhausted after one epoch: pass a re-iterable (a list, or an "
                "object whose __iter__ starts over) or stop with max_steps."
            )
        log_window(engine, window)
        if exhausted:
            if val_loader is not None and engine.val_every_n_steps is None:
                validation_pass(engine, val_loader)
            engine._call("on_train_epoch_end")
            engine.current_epoch += 1
            engine.batch_idx = 0
        elif val_loader is not None and engine.val_every_n_steps is None:
            validation_pass(engine, val_loader)  # stopped mid-epoch: still report validation
    with engine.timings.phase("step"):
        jax.block_until_ready(engine.state)
    engine.timings.stop()


def _finished(engine: Engine) -> bool:
    if engine.should_stop or reached_max_steps(engine):
        return True
    return engine.max_epochs is not None and engine.current_epoch >= engine.max_epochs


def reached_max_steps(engine: Engine) -> bool:
    return engine.max_steps is not None and engine.global_step >= engine.max_steps


def log_window(engine: Engine, window: MetricWindow) -> None:
    if len(window):
        with engine.timings.phase("step"):  # reading the metrics waits for the device
            metrics = window.compute()
        engine.callback_metrics.update(metrics)
        engine._call("on_log", metrics)


def validation_pass(engine: Engine, loader: Any) -> dict[str, float]:
    """`validation_step` over `loader`; metrics weighted by batch rows, logged via `on_log`."""
    resume = engine.timings.switch("validation")
    engine._call("on_validation_start")
    window = MetricWindow(engine._val_meta)
    in_flight = InFlight(in_flight_limit(engine))
    on_device = engine._placer.prefetch(loader.epoch(0, 0, engine._placer.rows_for))
    for batch, rows in on_device:
        outputs = engine._eval_step(engine.state.params, engine.state.rest, batch)
        on_device.refill()
        window.add(outputs, weight=rows)
        in_flight.add(outputs)
        window.settle()
    metrics = window.compute() if len(window) else {}
    engine.callback_metrics.update(metrics)
    if metrics:
        engine._call("on_log", metrics)
    engine._call("on_validation_end")
    engine.timings.switch(resume)
    return metrics


QUEUED_BATCH_BYTES = 256 * 2**20  # what steps queued on one CPU device may hold in batches


def in_flight_limit(engine: Engine) -> int:
    """`max_in_flight`, or the default: 2, except on a single CPU device, where steps queue up
    to the next metric read (at most 64, and 256 MiB of batches). There each wait for the
    device costs compute, as host and device share the cores: ~2.5% of a 17 ms step with 2 in
    flight, none when the host waits only at metric reads."""
    if engine.max_in_flight is not None:
        return engine.max_in_flight
    devices = engine.strategy.mesh.devices
    if devices.size == 1 and devices.flat[0].platform == "cpu":
        by_memory = QUEUED_BATCH_BYTES // max(engine._batch_bytes, 1)
        return max(2, min(engine.log_every_n_steps, 64, by_memory))
    return 2


class InFlight:
    """Bounds how many dispatched steps are queued ahead of the host: past `limit`, wait for
    the oldest (bounds memory, and avoids the XLA:CPU collective stall of long queues)."""

    def __init__(self, limit: int):
        self.limit, self.queue = limit, collections.deque()

    def add(self, outputs: Any) -> None:
        self.queue.append(outputs)
        if len(self.queue) > self.limit:
            jax.block_until_ready(self.queue.popleft())
