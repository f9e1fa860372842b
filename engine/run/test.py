"""`TestRun`: `Engine.test`, the held-out evaluation: `test_step` over a whole data set, its
metrics weighted by rows like validation, logged once to the loggers (`on_log`)."""

from __future__ import annotations

from typing import Any

import jax

from meshfit.engine.module import MetricMeta
from meshfit.engine.run.evaluate import EvalRun
from meshfit.engine.run.inflight import InFlight
from meshfit.engine.run.metrics import MetricWindow
from meshfit.engine.step.build import PRECISIONS, make_eval_step


def trace_or_explain(step: Any, method: str, params: Any, rest: Any, batch: Any) -> Any:
    """`jax.eval_shape` of `step` on `batch` (nothing compiles); a failure names the batch's
    structure so a data/step mismatch reads as one, before any compile."""
    try:
        return jax.eval_shape(step, params, rest, batch)
    except Exception as exc:
        shapes = jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", batch)
        exc.add_note(
            f"[meshfit] {method} failed on a batch of structure {shapes}. Check that the data "
            f"has the structure {method} unpacks (e.g. a tuple (x, y) for `x, y = batch`)."
        )
        raise


class TestRun(EvalRun):
    """An `EvalRun` with the jitted `test_step` (`Engine.test`)."""

    __test__ = False  # not a pytest class

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.test_meta: dict[str, MetricMeta] = {}
        self.test_step = jax.jit(
            make_eval_step(
                self.graphdef,
                self.test_meta,
                compute_dtype=PRECISIONS[self.config.precision],
                context=self.strategy.step_context,
                method="test_step",
                loss_name="test_loss",
            )
        )

    def test_pass(self, loader: Any) -> dict[str, float]:
        """`test_step` over `loader`; metrics weighted by batch rows, logged via `on_log`."""
        hooks = self.hooks
        hooks("on_test_start")
        window = MetricWindow(self.test_meta)
        in_flight = InFlight(self.in_flight_limit)
        on_device = self.placer.prefetch(loader.epoch(0, 0, self.placer.rows_for))
        params, rest = self.eval_params(), self.state.rest
        batch_hook = hooks.has("on_test_batch_end")
        for i, (batch, rows) in enumerate(on_device):
            if i == 0:
                trace_or_explain(self.test_step, "test_step", params, rest, batch)
            outputs = self.test_step(params, rest, batch)
            on_device.refill()
            window.add(outputs, weight=rows)
            in_flight.add(outputs)
            window.settle()
            if batch_hook:
                hooks("on_test_batch_end", outputs, batch, i)
        metrics = window.compute() if len(window) else {}
        self.log(metrics)
        hooks("on_test_end")
        return metrics
