"""`EvalRun`: what any run needs to evaluate a model: its placement, live state, hooks, the
batch placer and the jitted eval step; and the validation pass itself."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshfit.engine.data import Placer
from meshfit.engine.module import MetricMeta
from meshfit.engine.run.hooks import HookTable
from meshfit.engine.run.inflight import InFlight, in_flight_limit
from meshfit.engine.run.metrics import MetricWindow
from meshfit.engine.state import LiveState, TrainState
from meshfit.engine.step.build import PRECISIONS, make_eval_step, split_module
from meshfit.strategies import Strategy
from meshfit.strategies.base import Layout


class EvalRun:
    """Owns the live state and the eval step of one run (`Engine.validate`, or a fit)."""

    def __init__(
        self,
        engine: Any,
        strategy: Strategy,
        graphdef: nnx.GraphDef,
        live: LiveState,
        layout: Layout | None = None,
    ):
        self.engine, self.config = engine, engine.config
        self.strategy, self.graphdef, self.live, self.layout = strategy, graphdef, live, layout
        self.hooks = HookTable(engine.callbacks, engine, engine.timings)
        self.placer = Placer(strategy.batch_sharding, strategy.replicated())
        self.val_meta: dict[str, MetricMeta] = {}
        self.eval_step = jax.jit(
            make_eval_step(
                graphdef,
                self.val_meta,
                compute_dtype=PRECISIONS[self.config.precision],
                context=strategy.step_context,
            )
        )
        self.in_flight_limit = in_flight_limit(
            self.config.max_in_flight, strategy.mesh, self.config.log_every_n_steps, 0
        )
        self.val_loader: Any = None

    @classmethod
    def for_module(
        cls, engine: Any, module: nnx.Module, strategy: Strategy, extra: dict | None = None
    ) -> EvalRun:
        """A run over `module`'s own weights (no optimizer state), laid out by `strategy`;
        `extra`: in-step transform states to evaluate with (see `eval_params`)."""
        graphdef, params, rest = split_module(module)
        state = TrainState(jnp.zeros((), jnp.int32), params, rest, (), dict(extra or {}))
        layout = strategy.layout(jax.eval_shape(lambda s: s, state))
        state = jax.device_put(state, layout.shardings, may_alias=False)
        return cls(engine, strategy, graphdef, LiveState(state), layout)

    @property
    def state(self) -> TrainState:
        return self.live.tree

    def eval_params(self) -> Any:
        """The parameters evaluation uses: the trained ones, unless an in-step transform whose
        state this run holds provides others (`StepTransform.eval_params`, e.g. `EMA`)."""
        state = self.state
        params = state.params
        for t in self.engine.transforms:
            if t.state_key in state.extra:
                params = t.eval_params(state.extra[t.state_key], params)
        return params

    def log(self, metrics: dict[str, float]) -> None:
        """Make `metrics` the latest values and hand them to every `on_log` consumer."""
        if metrics:
            self.engine.callback_metrics.update(metrics)
            self.hooks("on_log", metrics)

    def validation_metric_names(self) -> set[str]:
        """Metrics a validation pass logs, found by tracing the eval step on the first val
        batch (shapes only, nothing runs). Empty without validation data."""
        if self.val_loader is None:
            return set()
        first = next(iter(self.val_loader.epoch(0, 0, self.placer.rows_for)), None)
        if first is None:
            return set()
        state = self.state
        return set(
            jax.eval_shape(self.eval_step, self.eval_params(), state.rest, self.placer.place(first))
        )

    def validation_pass(self, loader: Any) -> dict[str, float]:
        """`validation_step` over `loader`; metrics weighted by batch rows, logged via `on_log`."""
        timings = self.engine.timings
        resume = timings.switch("validation")
        self.hooks("on_validation_start")
        window = MetricWindow(self.val_meta)
        in_flight = InFlight(self.in_flight_limit)
        on_device = self.placer.prefetch(loader.epoch(0, 0, self.placer.rows_for))
        params, rest = self.eval_params(), self.state.rest
        for batch, rows in on_device:
            outputs = self.eval_step(params, rest, batch)
            on_device.refill()
            window.add(outputs, weight=rows)
            in_flight.add(outputs)
            window.settle()
        metrics = window.compute() if len(window) else {}
        self.log(metrics)
        self.hooks("on_validation_end")
        timings.switch(resume)
        return metrics
