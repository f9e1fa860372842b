"""`TensorBoardLogger`: scalars and hyperparameters with tensorboardX, on process 0 only."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


def next_version_dir(root: str) -> str:
    """`root/version_N` with N one past the largest existing version."""
    versions = [
        int(m.group(1))
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if (m := re.fullmatch(r"version_(\d+)", name))
    ]
    return os.path.join(root, f"version_{max(versions, default=-1) + 1}")


class TensorBoardLogger(Callback):
    """Writes every logged metric at the log cadence (and after validation) as a scalar,
    keyed by the optimizer step, plus the run's hyperparameters.

    A log is written at the next step's `on_train_batch_end` (tensorboardX takes ~0.2 ms a
    scalar; right after a metric read the device would wait for it), or at the end of a
    validation, epoch or fit.

    Logs go to `save_dir/version_N` (default `<default_root_dir>/tensorboard`); see them with
    `tensorboard --logdir runs/tensorboard`.
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    epoch_end_reads_metrics = False  # its epoch end only writes what was logged already

    def __init__(self, save_dir: str | None = None, flush_secs: int = 30):
        self.save_dir, self.flush_secs = save_dir, flush_secs
        self.log_dir: str | None = None
        self.writer = None
        self._pending: list[tuple[int, dict[str, float]]] = []

    def on_fit_start(self, engine: Engine) -> None:
        if not engine.is_global_zero or self.writer is not None:
            return
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams as hparams_summaries

        root = self.save_dir or os.path.join(engine.default_root_dir, "tensorboard")
        self.log_dir = next_version_dir(root)
        self.writer = SummaryWriter(self.log_dir, flush_secs=self.flush_secs)
        hparams = {
            k: (v if isinstance(v, int | float | str | bool) else str(v))
            for k, v in engine.hparams.items()
        }
        # Written through this writer (add_hparams would open a second one on the same file).
        for summary in hparams_summaries(hparams, {}):
            self.writer.file_writer.add_summary(summary, 0)

    def on_log(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            self._pending.append((engine.global_step, metrics))

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending and self._pending[-1][0] < engine.global_step:
            self._write()  # the step after the log is running: the host has time

    def on_validation_end(self, engine: Engine) -> None:
        self._write()

    def on_train_epoch_end(self, engine: Engine) -> None:
        self._write()

    def on_fit_end(self, engine: Engine) -> None:
        self._write()

    def _write(self) -> None:
        for step, metrics in self._pending:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
        self._pending.clear()

    def teardown(self, engine: Engine) -> None:
        if self.writer is not None:
            self._write()
            self.writer.close()
            self.writer = None
