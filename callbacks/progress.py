"""`ProgressBar`: one tqdm bar for the whole fit (and one per `test` / `predict`), on process 0."""

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
    line (never a new bar), and metrics refresh at the log cadence, so no step waits for it.

    The bar appears with the first step, so everything printed at fit start (the hardware
    line, the model summary, a logger's banner) comes before it rather than through it."""

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    observes_only = True  # its log and batch-end hooks never steer the run

    def __init__(self, refresh_rate: float = 0.2, leave: bool = True, file: Any = None):
        self.refresh_rate, self.leave, self.file = refresh_rate, leave, file
        self.bar: tqdm | None = None
        self.eval_bar: tqdm | None = None  # Engine.test / Engine.predict
        self._shown: dict[str, str] = {}
        self._active = False
        self._initial = 0

    def on_fit_start(self, engine: Engine) -> None:
        self._active, self._initial, self._shown = engine.is_global_zero, engine.global_step, {}

    def _total(self, engine: Engine) -> int | None:
        total = engine.max_steps
        if engine.max_epochs is not None and engine.num_training_batches is not None:
            epoch_steps = engine.max_epochs * engine.num_training_batches
            total = min(total, epoch_steps) if total is not None else epoch_steps
        return total

    def _ensure_bar(self, engine: Engine) -> tqdm | None:
        if self.bar is None and self._active:
            self.bar = tqdm(
                total=self._total(engine),
                initial=self._initial,
                unit="step",
                dynamic_ncols=True,
                mininterval=self.refresh_rate,
                leave=self.leave,
                file=self.file,
            )
            self._set_epoch(engine)
        return self.bar

    def _set_epoch(self, engine: Engine) -> None:
        if self.bar is not None:
            of = f"/{engine.max_epochs}" if engine.max_epochs is not None else ""
            self.bar.set_description(f"Epoch {engine.current_epoch + 1}{of}", refresh=False)

    def on_train_epoch_start(self, engine: Engine) -> None:
        self._set_epoch(engine)

    def on_train_dispatch_end(self, engine: Engine, steps: int) -> None:
        if self._ensure_bar(engine) is not None:
            self.bar.update(steps)

    def on_log(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self._ensure_bar(engine) is None:
            return
        meta = {**engine.metric_meta, **engine.val_metric_meta}
        for name, value in metrics.items():
            if name == "loss" or (name in meta and meta[name].prog_bar):
                self._shown[name] = _fmt(value)
        self.bar.set_postfix(self._shown, refresh=False)

    # ------------------------------------------------------------------ test / predict
    def _open_eval_bar(self, engine: Engine, what: str) -> None:
        """A bar of its own over the batches of `Engine.test` / `Engine.predict` (process 0)."""
        if engine.is_global_zero:
            self.eval_bar = tqdm(
                desc=what,
                unit="batch",
                dynamic_ncols=True,
                mininterval=self.refresh_rate,
                leave=self.leave,
                file=self.file,
            )

    def _advance(self, engine: Engine, *args: Any) -> None:
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def _close_eval_bar(self, engine: Engine, metrics: dict[str, str] | None = None) -> None:
        if self.eval_bar is not None:
            if metrics:
                self.eval_bar.set_postfix(metrics, refresh=True)
            self.eval_bar.close()
            self.eval_bar = None

    def on_test_start(self, engine: Engine) -> None:
        self._open_eval_bar(engine, "Testing")

    def on_predict_start(self, engine: Engine) -> None:
        self._open_eval_bar(engine, "Predicting")

    on_test_batch_end = _advance
    on_predict_batch_end = _advance

    def on_test_end(self, engine: Engine) -> None:
        metrics = engine.callback_metrics
        self._close_eval_bar(
            engine, {k: _fmt(v) for k, v in metrics.items() if k.startswith("test")}
        )

    def on_predict_end(self, engine: Engine) -> None:
        self._close_eval_bar(engine)

    def teardown(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._active = False
