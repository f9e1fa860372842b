"""`DynamicLossScaling`: keeps small fp16 gradients representable, skips overflowing steps.

Hand-written (a scale and two counters as plain arrays in the train state) so it jits, shards
and checkpoints like any other leaf. Order inside the step: the loss is multiplied by the scale
(per micro-batch under accumulation), gradients are accumulated, then divided by the scale here,
before clipping (the head of the optimizer chain); a non-finite gradient skips the update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from meshfit.engine.hooks import StepTransform, all_finite


class DynamicLossScaling(StepTransform):
    """Scale the loss by `loss_scale`; on non-finite gradients skip the update and shrink it.

    - Every step: grads are divided by the scale. If any is inf/nan the update is skipped
      entirely (parameters, optimizer state, step counter, schedule, other variables keep their
      values), the scale is divided by `factor` (not below `min_scale`) and `skipped_steps` grows.
    - After `growth_interval` finite steps in a row the scale is multiplied by `factor`.
    - Logged every step: `loss_scale` (the smallest in a log window) and `skipped_steps` (the
      total so far). State: `engine.state.extra["DynamicLossScaling"]`, checkpointed with it.

    Use with `Engine(precision="fp16")`; bf16 has float32's range and rarely needs it.
    """

    def __init__(
        self,
        init_scale: float = 2.0**15,
        growth_interval: int = 2000,
        factor: float = 2.0,
        min_scale: float = 1.0,
    ):
        if not (isinstance(init_scale, int | float) and init_scale > 0):
            raise ValueError(f"DynamicLossScaling(init_scale={init_scale!r}) must be > 0.")
        if isinstance(growth_interval, bool) or not (
            isinstance(growth_interval, int) and growth_interval >= 1
        ):
            raise ValueError(
                f"DynamicLossScaling(growth_interval={growth_interval!r}) must be a positive "
                "integer: the number of finite steps in a row before the scale grows."
            )
        if not (isinstance(factor, int | float) and factor > 1):
            raise ValueError(
                f"DynamicLossScaling(factor={factor!r}) must be > 1 (the scale is multiplied "
                "or divided by it), e.g. factor=2."
            )
        if not (isinstance(min_scale, int | float) and 0 < min_scale <= init_scale):
            raise ValueError(
                f"DynamicLossScaling(min_scale={min_scale!r}) must be in (0, init_scale]."
            )
        self.init_scale, self.growth_interval = float(init_scale), growth_interval
        self.factor, self.min_scale = float(factor), float(min_scale)

    #: the latest total of skipped steps; the most conservative scale of a window
    metric_reductions = {"skipped_steps": "max", "loss_scale": "min"}  # noqa: RUF012

    def init(self, params: Any) -> dict[str, jax.Array]:
        return {
            "loss_scale": jnp.asarray(self.init_scale, jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32),
            "skipped_steps": jnp.zeros((), jnp.int32),
        }

    def scale_loss(self, loss: jax.Array, state: dict[str, jax.Array]) -> jax.Array:
        return loss * state["loss_scale"]

    def process_grads(
        self, grads: Any, state: dict[str, jax.Array], loss: jax.Array | None = None
    ) -> tuple[Any, dict[str, jax.Array], jax.Array]:
        scale = state["loss_scale"]
        grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
        finite = all_finite(grads)
        good = jnp.where(finite, state["good_steps"] + 1, 0)
        grow = good >= self.growth_interval
        new_scale = jnp.where(
            finite,
            jnp.where(grow, scale * self.factor, scale),
            jnp.maximum(scale / self.factor, self.min_scale),
        )
        new_state = {
            "loss_scale": new_scale.astype(jnp.float32),
            "good_steps": jnp.where(grow, 0, good).astype(jnp.int32),
            "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
        }
        return grads, new_state, finite

    def metrics(self, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {
            "loss_scale": state["loss_scale"],
            "skipped_steps": state["skipped_steps"].astype(jnp.float32),
        }
