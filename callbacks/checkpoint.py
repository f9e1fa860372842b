"""`ModelCheckpoint`: asynchronous, atomic orbax checkpoints of everything a run needs to resume."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from meshfit.engine.checkpoint.clock import SYNC_EVERY_N_STEPS, SaveClock
from meshfit.engine.checkpoint.find import default_dir
from meshfit.engine.checkpoint.writer import CheckpointWriter
from meshfit.engine.hooks import Callback
from meshfit.engine.processes import distributed

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

MODES = ("min", "max")


def metric_source(engine: Engine, monitor: str, who: str) -> str:
    """ "train" or "val": where `monitor` is logged; a clear error when it never is."""
    train = engine.train_metric_names()
    if monitor in train:
        return "train"
    val = engine.validation_metric_names()
    if monitor in val:
        return "val"
    hint = (
        "no val_data was passed to fit, so validation metrics are never logged"
        if engine.val_loader is None
        else f"validation logs {sorted(val)}"
    )
    raise ValueError(
        f"{who}(monitor={monitor!r}): this metric is never logged. The training step logs "
        f"{sorted(train)}; {hint}. Monitor one of those, or log {monitor!r} with self.log "
        "in training_step / validation_step."
    )


class ModelCheckpoint(Callback):
    """Saves checkpoints asynchronously (training continues while orbax writes) and atomically.

    Args:
        dirpath: where step directories go; default `<default_root_dir>/checkpoints`.
        every_n_steps / every_n_epochs / every_n_seconds: save cadence (one of them). With
            none: after every validation when monitoring a validation metric, else at the end of
            every epoch. `every_n_seconds` saves at the first step boundary after that much time
            since the last save (with several processes: decided by process 0 and shared every
            10 steps, so all save at the same step); with `monitor`, at the next step where the
            metric is fresh.
        keep_every_n_steps: also save at every multiple of this step count, and never delete
            those checkpoints (permanent snapshots beside the top-k ones).
        monitor: a logged metric; keeps the best `save_top_k` checkpoints by it (`mode` min/max).
            Read right after it is logged (after validation for validation metrics): never stale.
        save_top_k: how many checkpoints to keep (-1: all). Without `monitor`: the newest ones.
        save_last: always also keep the newest checkpoint, and save one at the end of fit.

    A checkpoint holds parameters, optimizer state, step, module RNG state, every in-step
    transform state, each callback's `state_dict` and the data position. Resume with
    `engine.fit(module, data, ckpt_path="last" | "best" | path)`.
    """

    run_last = True  # saves after the other callbacks updated their state for this step

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch

    def next_host_step(self, engine: Engine) -> int | None:
        """A dispatch ends at every step where a save may happen (the save sees that step's
        state): `every_n_steps`, `keep_every_n_steps`, and the clock's check steps."""
        step = engine.global_step
        cadences = [self.every_n_steps, self.keep_every_n_steps]
        if self.every_n_seconds is not None and distributed.process_count() > 1:
            cadences.append(SYNC_EVERY_N_STEPS)  # where process 0's clock is shared
        nexts = [(step // every + 1) * every for every in cadences if every]
        return min(nexts, default=None)

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_seconds: float | None = None,
        keep_every_n_steps: int | None = None,
    ):
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("every_n_epochs", every_n_epochs),
            ("keep_every_n_steps", keep_every_n_steps),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"ModelCheckpoint({name}={value!r}): use a positive int or None.")
        if every_n_seconds is not None and (
            not isinstance(every_n_seconds, int | float)
            or isinstance(every_n_seconds, bool)
            or not every_n_seconds > 0
        ):
            raise ValueError(
                f"ModelCheckpoint(every_n_seconds={every_n_seconds!r}): use a positive number of "
                "seconds or None."
            )
        cadences = [
            name
            for name, value in (
                ("every_n_steps", every_n_steps),
                ("every_n_epochs", every_n_epochs),
                ("every_n_seconds", every_n_seconds),
            )
            if value is not None
        ]
        if len(cadences) > 1:
            raise ValueError(
                f"ModelCheckpoint: set one of every_n_steps, every_n_epochs, every_n_seconds, "
                f"not {' and '.join(cadences)}. (keep_every_n_steps combines with any of them.)"
            )
        if mode not in MODES:
            raise ValueError(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(
                f"ModelCheckpoint(save_top_k={save_top_k!r}): use -1 (keep all), 0 or a "
                "positive int."
            )
        if monitor is None and save_top_k == 0 and not save_last:
            raise ValueError("ModelCheckpoint(save_top_k=0, save_last=False) would keep nothing.")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.every_n_seconds, self.keep_every_n_steps = every_n_seconds, keep_every_n_steps
        self._clock: SaveClock | None = None
        self._snapshot = False  # a keep_every_n_steps save is due at this step
        self.monitor, self.mode, self.save_top_k, self.save_last = (
            monitor,
            mode,
            save_top_k,
            save_last,
        )
        self.writer: CheckpointWriter | None = None
        self.best_model_score: float | None = None
        self.best_model_step: int | None = None
        self._source: str | None = None
        self._pending = False
        self._uncommitted: int | None = None  # a save a logger wants once it is committed
        self.save_blocking_s: list[float] = []

    # ------------------------------------------------------------------ setup
    def resolved_dirpath(self, engine: Engine) -> str:
        return os.path.abspath(self.dirpath or default_dir(engine.default_root_dir))

    @property
    def best_model_path(self) -> str | None:
        if self.writer is None or self.best_model_step is None:
            return None
        return os.path.join(self.writer.directory, str(self.best_model_step))

    def setup(self, engine: Engine) -> None:
        self.writer = CheckpointWriter(
            self.resolved_dirpath(engine),
            monitor=self.monitor,
            mode=self.mode,
            top_k=self.save_top_k,
            keep_last=self.save_last or self.monitor is None,
            keep_every_n_steps=self.keep_every_n_steps,
        )
        self._pending = self._snapshot = False

    def on_fit_start(self, engine: Engine) -> None:
        self._source = None
        self._clock = None if self.every_n_seconds is None else SaveClock(self.every_n_seconds)
        if self.monitor is None:
            return
        self._source = metric_source(engine, self.monitor, "ModelCheckpoint")
        stale_train = self.every_n_steps and self.every_n_steps % engine.log_every_n_steps
        if self._source == "train" and stale_train:
            raise ValueError(
                f"ModelCheckpoint(monitor={self.monitor!r}, every_n_steps="
                f"{self.every_n_steps}): training metrics are logged every "
                f"log_every_n_steps={engine.log_every_n_steps} steps, so the monitored "
                "value would be stale at most saves. Use every_n_steps as a multiple of "
                "log_every_n_steps (or lower log_every_n_steps)."
            )
        if self._source == "val":
            val_every = engine.val_every_n_steps
            if self.every_n_steps and (val_every is None or self.every_n_steps % val_every):
                raise ValueError(
                    f"ModelCheckpoint(monitor={self.monitor!r}, every_n_steps="
                    f"{self.every_n_steps}): validation runs "
                    + (f"every {val_every} steps" if val_every else "only at epoch ends")
                    + ", so the monitored value would be stale at the saves. Use every_n_steps "
                    "as a multiple of Engine(val_every_n_steps=...), or drop every_n_steps "
                    "to save after every validation."
                )
            if self.every_n_epochs and val_every is not None:
                raise ValueError(
                    f"ModelCheckpoint(monitor={self.monitor!r}, every_n_epochs="
                    f"{self.every_n_epochs}): with Engine(val_every_n_steps={val_every}) "
                    "validation does not run at epoch ends. Use every_n_steps (a multiple of "
                    "val_every_n_steps) or drop the cadence to save after every validation."
                )

    # ------------------------------------------------------------------ cadence
    def _epoch_end(self, engine: Engine) -> bool:
        n = engine.num_training_batches
        return n is not None and engine.batch_idx >= n

    def _validation_follows(self, engine: Engine) -> bool:
        if engine.val_loader is None:
            return False
        every = engine.val_every_n_steps
        return bool(every and engine.global_step % every == 0)

    def _fresh_train_metric(self, engine: Engine) -> bool:
        """False while a monitored training metric was not logged at this step."""
        return self._source != "train" or engine.global_step % engine.log_every_n_steps == 0

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = engine.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._pending = True
        if self._clock is not None and self._clock.due(step):  # the same answer everywhere
            self._pending = True
        if self.keep_every_n_steps and step % self.keep_every_n_steps == 0:
            self._snapshot = True
        # Save once the step's validation / epoch end (which may change callback state) is done,
        # and only where the state is this step's (the end of a fused dispatch).
        if self._validation_follows(engine) or self._epoch_end(engine):
            return
        if engine.dispatch_end_step not in (None, step):
            return
        if self._snapshot or (
            self._pending and self._source != "val" and self._fresh_train_metric(engine)
        ):
            self._save(engine)

    def on_validation_end(self, engine: Engine) -> None:
        if self._source == "val" and not (
            self.every_n_steps or self.every_n_epochs or self.every_n_seconds
        ):
            self._pending = True
        if self._epoch_end(engine):
            return
        if self._snapshot or (self._pending and self._fresh_train_metric(engine)):
            self._save(engine)

    def on_train_epoch_end(self, engine: Engine) -> None:
        every = self.every_n_epochs
        cadence = self.every_n_steps or self.every_n_seconds
        if every is None and not cadence and self._source != "val":
            every = 1
        if every and (engine.current_epoch + 1) % every == 0:
            self._pending = True
        if self._pending or self._snapshot:
            self._save(engine, position=(engine.current_epoch + 1, 0))

    def on_fit_end(self, engine: Engine) -> None:
        if (
            self._pending
            or self._snapshot
            or (self.save_last and self.writer.latest_step() != engine.global_step)
        ):
            self._save(engine)
        self.writer.wait()
        self._announce_committed(engine)

    def teardown(self, engine: Engine) -> None:
        if self.writer is not None:
            self.writer.close()  # waits for a write still in progress

    def save_for_preemption(self, engine: Engine) -> str:
        """Save at the current step boundary (unless already saved) and wait until complete."""
        saved = self.writer.save(engine.global_step, *engine.checkpoint_state())
        self.writer.wait()
        self._announce_committed(engine)
        if saved and self._wants_paths(engine):
            self._uncommitted = engine.global_step
            self._announce_committed(engine)
        return self.writer.directory

    # ------------------------------------------------------------------ saving
    def _score(self, engine: Engine) -> float | None:
        if self.monitor is None:
            return None
        value = engine.callback_metrics.get(self.monitor)
        return None if value is None or not math.isfinite(value) else float(value)

    def _save(self, engine: Engine, position: tuple[int, int] | None = None) -> None:
        # A snapshot that is not also a cadence save carries no score: its metric may be stale,
        # and it is kept by keep_every_n_steps, not ranked among the best.
        scored = self._pending or not self._snapshot
        self._pending = self._snapshot = False
        if self._clock is not None:
            self._clock.reset()
        score = self._score(engine) if scored else None
        if score is not None and self._better(score):
            self.best_model_score, self.best_model_step = score, engine.global_step
        if self._uncommitted is not None:
            self.writer.wait()  # the previous save (long done, usually) is committed
            self._announce_committed(engine)
        state, meta = engine.checkpoint_state(position)
        if self.writer.save(engine.global_step, state, meta, score=score):
            self.save_blocking_s.append(self.writer.last_blocking_s)
            if self._wants_paths(engine):
                self._uncommitted = engine.global_step

    @staticmethod
    def _wants_paths(engine: Engine) -> bool:
        return any(lg.log_checkpoints and lg.is_open for lg in engine.loggers)

    def _announce_committed(self, engine: Engine) -> None:
        """`log_checkpoint(path)` to the loggers that want it, once the save is committed."""
        step, self._uncommitted = self._uncommitted, None
        path = None if step is None else os.path.join(self.writer.directory, str(step))
        if path is None or not os.path.isdir(path):  # nothing pending, or not kept by top-k
            return
        for logger in engine.loggers:
            if logger.log_checkpoints and logger.is_open:
                logger.log_checkpoint(path)

    def _better(self, score: float) -> bool:
        best = self.best_model_score
        return best is None or (score < best if self.mode == "min" else score > best)

    def state_dict(self) -> dict[str, Any]:
        return {"best_model_score": self.best_model_score, "best_model_step": self.best_model_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_model_score = state.get("best_model_score")
        self.best_model_step = state.get("best_model_step")
