"""`NanGuard`: stop (or warn) on a non-finite loss, keeping the last good state.

`Engine(nan_guard="error" | "warn" | False)` adds it (default "error") unless the run uses
`DynamicLossScaling`, which owns non-finite steps (it skips them and shrinks the scale).

In the step, the guard tests the loss (under gradient accumulation, the window's mean loss, so a
bad micro-batch poisons its window); `NanGuard(check_grads=True)` also tests every gradient, for
overflows in the backward pass only. A bad update is skipped (the engine keeps the whole state). The host checks the guard's counters
only when it reads metrics anyway (the log cadence, the end of fit): no per-step sync.

- "error": from the first bad step on, every update is skipped until the host raises
  `FloatingPointError` naming the step and the metric; `engine.state` and the module keep the
  last good state, so `on_exception` hooks (a checkpoint callback) can save it.
- "warn": bad steps are skipped, a warning reports them, training goes on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from meshfit.callbacks.loss_scaling import DynamicLossScaling
from meshfit.engine.hooks import Callback, StepTransform, all_finite

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


class NanGuard(StepTransform):
    """Skip updates with a non-finite loss (or, with `check_grads=True`, gradient); raise
    ("error") or warn ("warn").

    Checking the loss is a scalar test, free inside the step; checking every gradient is one
    more pass over all of them (~10% of a small model's step on CPU), so it is opt-in.
    """

    # Its log check may run one dispatch late: the skipped updates keep the state good and
    # the guard's state names the first bad step.
    observes_only = True

    def __init__(self, mode: str = "error", check_grads: bool = False):
        if mode not in ("error", "warn"):
            raise ValueError(f"NanGuard(mode={mode!r}): use 'error' (stop training) or 'warn'.")
        self.mode, self.check_grads = mode, check_grads
        self._reported = 0

    def init(self, params: Any) -> dict[str, jax.Array]:
        zero = jnp.zeros((), jnp.int32)
        return {"steps": zero, "bad_steps": zero, "first_bad_step": zero - 1}

    def process_grads(self, grads: Any, state: dict[str, jax.Array], loss: jax.Array | None = None):
        # Under accumulation `loss` averages the window, so one bad micro-batch flags it.
        finite = jnp.isfinite(loss) if loss is not None else jnp.array(True)
        if self.check_grads or loss is None:
            finite = finite & all_finite(grads)
        first = state["first_bad_step"]
        new_state = {
            "steps": state["steps"] + 1,
            "bad_steps": state["bad_steps"] + (~finite).astype(jnp.int32),
            "first_bad_step": jnp.where((first < 0) & ~finite, state["steps"], first),
        }
        ok = finite if self.mode == "warn" else finite & (first < 0)
        return grads, new_state, ok

    # ---------------------------------------------------------------- host side
    def on_fit_start(self, engine: Engine) -> None:  # a resumed run reports only new bad steps
        self._reported = int(jax.device_get(engine.state.extra[self.state_key]["bad_steps"]))

    def on_log(self, engine: Engine, metrics: dict[str, float]) -> None:
        if "loss" in metrics:  # the training window (validation passes log other names)
            self._check(engine, metrics["loss"])

    def on_fit_end(self, engine: Engine) -> None:
        self._check(engine, engine.callback_metrics.get("loss"), final=True)

    def _check(self, engine: Engine, window_loss: float | None, final: bool = False) -> None:
        """Read the guard's counters (when the host reads metrics anyway) and report."""
        loss_only = not (final or self.check_grads)
        if loss_only and window_loss is not None and math.isfinite(window_loss):
            return  # the window's mean loss is finite, so no step of it was skipped
        extra = getattr(engine.state, "extra", None) or {}
        if self.state_key not in extra:  # e.g. Engine.validate without fit: no training state
            return
        state = jax.device_get(extra[self.state_key])
        bad = int(state["bad_steps"])
        if bad <= self._reported:
            return
        new, self._reported = bad - self._reported, bad
        first = int(state["first_bad_step"])
        # the logged loss averages the steps since the previous log, so it is non-finite iff a
        # step of that window had a non-finite loss
        if window_loss is not None and not math.isfinite(window_loss):
            what = f"loss = {window_loss}"
        else:
            what = f"a gradient is non-finite while the loss is finite (loss = {window_loss})"
        if self.mode == "error":
            raise FloatingPointError(
                f"Non-finite training metric at global step {first}: {what}. Training stopped; "
                f"the update of step {first} and of every step after it was skipped, so "
                "engine.state and the module hold the last good state (from before that step). "
                "Common fixes: a lower learning rate, gradient clipping "
                "(Engine(gradient_clip_val=1.0)), checking the data for nan/inf, or "
                "DynamicLossScaling() with precision='fp16'. To skip such steps and go on, "
                "use Engine(nan_guard='warn')."
            )
        warnings.warn(
            f"{new} training step(s) had a non-finite loss or gradient and were skipped "
            f"({bad} in total, the first at global step {first}; in the latest log window: "
            f"{what}). Engine(nan_guard='error') stops at the first one.",
            RuntimeWarning,
            stacklevel=2,
        )


def default_nan_guard(mode: str | bool | None, callbacks: Sequence[Callback]) -> list[Callback]:
    """The guard `Engine(nan_guard=mode)` adds: none if off, given, or loss scaling is used."""
    if not mode or any(isinstance(cb, NanGuard | DynamicLossScaling) for cb in callbacks):
        return []
    return [NanGuard(mode)]
