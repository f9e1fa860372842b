"""`ProgressBar`: one tqdm bar for the whole fit, on process 0 only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class ProgressBar(Callback):
    """Shows epoch, step, loss, `prog_bar` metrics and steps/s. Validation updates the same
    line (never a new bar), and metrics refresh at the log cadence, so no step waits for it."""

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch

    def __init__(self, refresh_rate: float = 0.2, leave: bool = True, file: Any = None):
        self.refresh_rate, self.leave, self.file = refresh_rate, leave, file
        self.bar: tqdm | None = None
        self._shown: dict[str, str] = {}

    def on_fit_start(self, engine: Engine) -> None:
        if not engine.is_global_zero:
            return
        total = engine.max_steps
        if engine.max_epochs is not None and engine.num_training_batches is not None:
            epoch_steps = engine.max_epochs * engine.num_training_batches
            total = min(total, epoch_steps) if total is not None else epoch_steps
        self.bar = tqdm(
            total=total,
            initial=engine.global_step,
            unit="step",
            dynamic_ncols=True,
            mininterval=self.refresh_rate,
            leave=self.leave,
            file=self.file,
        )
        self._set_epoch(engine)

    def _set_epoch(self, engine: Engine) -> None:
        if self.bar is not None:
            of = f"/{engine.max_epochs}" if engine.max_epochs is not None else ""
            self.bar.set_description(f"Epoch {engine.current_epoch + 1}{of}", refresh=False)

    def on_train_epoch_start(self, engine: Engine) -> None:
        self._set_epoch(engine)

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        meta = {**engine.metric_meta, **engine.val_metric_meta}
        for name, value in metrics.items():
            if name == "loss" or (name in meta and meta[name].prog_bar):
                self._shown[name] = _fmt(value)
        self.bar.set_postfix(self._shown, refresh=False)

    def teardown(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
