"""`TensorBoardLogger`: scalars and hyperparameters with tensorboardX, on process 0 only."""

from __future__ import annotations

import os
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
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    observes_only = True  # its log and batch-end hooks never steer the run
    epoch_end_reads_metrics = False  # its epoch end only writes what was logged already

    def __init__(self, save_dir: str | None = None, flush_secs: int = 30):
        super().__init__()
        self.save_dir, self.flush_secs = save_dir, flush_secs
        self.writer = None

    def open(self, engine: Engine, resume_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        self.save_dir = self.save_dir or os.path.join(engine.default_root_dir, "tensorboard")
        if self.log_dir is None or resume_step is None:
            self.log_dir = next_version_dir(self.save_dir)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(self.log_dir, flush_secs=self.flush_secs, purge_step=purge)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        from tensorboardX.summary import hparams as hparams_summaries

        hparams = {
            k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in params.items()
        }
        # Written through this writer (add_hparams would open a second one on the same file).
        for summary in hparams_summaries(hparams, {}):
            self.writer.file_writer.add_summary(summary, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # One event per step holding every scalar: `add_scalar` builds one per value through
        # NumPy checks, ~4x the host time (it competes with small models' steps).
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        self.writer.file_writer.add_summary(Summary(value=values), step)

    def finalize(self, status: str) -> None:
        self.writer.close()
        self.writer = None
