"""`TensorBoardLogger`: scalars and hyperparameters with tensorboardX, on process 0 only."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from meshfit.callbacks.logger import Logger, next_version_dir

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

__all__ = ["TensorBoardLogger", "next_version_dir"]


class TensorBoardLogger(Logger):
    """Writes every logged metric as a scalar keyed by the optimizer step, plus the run's
    hyperparameters (writes wait for the next step: see `Logger`).

    Logs go to `save_dir/version_N` (default `<default_root_dir>/tensorboard`); see them with
    `tensorboard --logdir runs/tensorboard`. A resumed run writes to the same version directory
    and tells TensorBoard to hide what it had logged after the checkpoint (`purge_step`).

    Events are written in this thread through tensorboardX's `EventsWriter` (a buffered file,
    flushed every `flush_secs` and at the end): `SummaryWriter` sends each event through a
    multiprocessing queue to a writer thread, ~5x the host time per event, and that time
    competes with a small model's steps. `writer` is a `SummaryWriter` on the same directory
    for anything else (images, histograms), opened on first use.
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    observes_only = True  # its log and batch-end hooks never steer the run
    epoch_end_reads_metrics = False  # its epoch end only writes what was logged already

    def __init__(self, save_dir: str | None = None, flush_secs: int = 30):
        super().__init__()
        self.save_dir, self.flush_secs = save_dir, flush_secs
        self._events = None  # tensorboardX EventsWriter, while the run is open
        self._summary_writer = None
        self._flushed_at = 0.0

    def open(self, engine: Engine, resume_step: int | None) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.save_dir = self.save_dir or os.path.join(engine.default_root_dir, "tensorboard")
        if self.log_dir is None or resume_step is None:
            self.log_dir = next_version_dir(self.save_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        self._events = EventsWriter(os.path.join(self.log_dir, "events"))
        if resume_step is not None:  # what SummaryWriter(purge_step=...) writes first
            purge = resume_step + 1
            self._events.write_event(Event(step=purge, file_version="brain.Event:2"))
            start = SessionLog(status=SessionLog.START)
            self._events.write_event(Event(step=purge, session_log=start))
        self._flush()

    @property
    def writer(self) -> Any:
        """A tensorboardX `SummaryWriter` on this run's directory (opened on first use)."""
        if self._summary_writer is None and self.log_dir is not None:
            from tensorboardX import SummaryWriter

            # its own file: two event files opened in one second would share a name
            self._summary_writer = SummaryWriter(
                self.log_dir, flush_secs=self.flush_secs, filename_suffix=".writer"
            )
        return self._summary_writer

    def _write(self, summary: Any, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._events.write_event(Event(summary=summary, step=step, wall_time=time.time()))

    def _flush(self) -> None:
        self._events.flush()
        self._flushed_at = time.monotonic()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams as hparams_summaries

        hparams = {
            k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in params.items()
        }
        for summary in hparams_summaries(hparams, {}):
            self._write(summary, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # One event per step holding every scalar: `add_scalar` builds one per value through
        # NumPy checks, ~4x the host time (it competes with small models' steps).
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        self._write(Summary(value=values), step)

    def write_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        super().write_rows(rows)
        if time.monotonic() - self._flushed_at >= self.flush_secs:
            self._flush()

    def finalize(self, status: str) -> None:
        self._events.close()  # flushes
        self._events = None
        if self._summary_writer is not None:
            self._summary_writer.close()
            self._summary_writer = None
