"""`LearningRateMonitor`: the learning rate of the latest optimizer update, at the log cadence."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
from optax.schedules import InjectHyperparamsState, InjectStatefulHyperparamsState

from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


def _is_injected(node: Any) -> bool:
    return isinstance(node, InjectStatefulHyperparamsState | InjectHyperparamsState)


def injected_learning_rates(opt_state: Any) -> list[jax.Array]:
    """Every `learning_rate` held by an `optax.inject_hyperparams` state inside `opt_state`
    (chains, `multi_transform`, wrappers), in tree order."""
    return [
        node.hyperparams["learning_rate"]
        for node in jax.tree.leaves(opt_state, is_leaf=_is_injected)
        if _is_injected(node) and "learning_rate" in node.hyperparams
    ]


class LearningRateMonitor(Callback):
    """Logs the learning rate applied by the most recent optimizer update every
    `log_every_n_steps`, under `name` (or `name/0`, `name/1`, ... for several optimizers).

    The rate comes from, in order: the `schedule` function passed here; the schedule that
    `configure_optimizers` named with the dict form `{"optimizer": tx, "lr_schedule": fn}`
    (`engine.lr_schedule`); the optimizer state when the optimizer is built with
    `optax.inject_hyperparams` (e.g. `optax.inject_hyperparams(optax.adam)(learning_rate=
    optax.cosine_decay_schedule(1e-3, 1000))`). A schedule is evaluated at the count of that
    update: after `k` updates all give `schedule(k - 1)`, the rate the k-th update used.
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    observes_only = True  # its log and batch-end hooks never steer the run

    def __init__(self, schedule: Callable[[int], Any] | None = None, name: str = "lr"):
        if schedule is not None and not callable(schedule):
            raise TypeError(
                f"LearningRateMonitor(schedule=...) expects a function of the step (an optax "
                f"schedule), got {type(schedule).__name__}. For a constant rate, log nothing."
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"LearningRateMonitor(name={name!r}): expected a non-empty string.")
        self.schedule, self.name = schedule, name
        self._active: Callable[[int], Any] | None = schedule  # this fit's schedule, if any
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_fit_start(self, engine: Engine) -> None:
        self.history = []
        self._active = self.schedule or getattr(engine, "lr_schedule", None)
        if self._active is None and not injected_learning_rates(engine.state.opt_state):
            raise ValueError(
                "LearningRateMonitor found no learning rate schedule. Return it from "
                "configure_optimizers with the dict form `{'optimizer': optax.adam(schedule), "
                "'lr_schedule': schedule}`, build the optimizer with optax.inject_hyperparams "
                "(e.g. `optax.inject_hyperparams(optax.adam)(learning_rate=schedule)`), or pass "
                "it: LearningRateMonitor(schedule=schedule)."
            )

    def read(self, engine: Engine) -> dict[str, float]:
        """The current learning rate(s) (one small device read)."""
        if self._active is not None:
            updates = int(jax.device_get(engine.state.step))
            rates = [self._active(max(updates - 1, 0))]
        else:
            rates = injected_learning_rates(engine.state.opt_state)
        rates = [float(r) for r in jax.device_get(rates)]
        if len(rates) == 1:
            return {self.name: rates[0]}
        return {f"{self.name}/{i}": r for i, r in enumerate(rates)}

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        if engine.global_step % engine.log_every_n_steps == 0:
            metrics = self.read(engine)
            self.history.append((engine.global_step, metrics))
            engine.log_metrics(metrics)
