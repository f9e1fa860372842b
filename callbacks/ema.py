"""`EMA`: an exponential moving average of the weights, kept inside the compiled step.

After each applied optimizer update, `ema = decay * ema + (1 - decay) * params` (no bias
correction); it starts equal to the initial parameters and, for the first `start_step` updates,
simply follows them. A skipped update (NaN guard, loss-scaling overflow) skips the average too,
and gradient accumulation averages once per update, not per micro-batch. The average lives in
`engine.state.extra["EMA"]`, laid out like the parameters (sharded under fsdp/hybrid/pipeline),
so it is donated, checkpointed and resumed bitwise with everything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshfit.engine.checkpoint.weights import EMA_STATE_KEY
from meshfit.engine.hooks import StepContext, StepTransform

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


class EMA(StepTransform):
    """Keep an exponential moving average of the parameters; evaluate with it.

    Args:
        decay: weight of the old average per update, in (0, 1) (e.g. 0.999 averages over
            roughly the last 1000 updates).
        start_step: the average equals the parameters for the first `start_step` updates and
            starts averaging after them (0: from the first update).
        use_for_eval: validation, test, predict and so `ModelCheckpoint`'s monitored metric
            use the averaged weights instead of the trained ones.
        swap_at_end: after a fit that finished, the module holds the averaged weights (default:
            the trained ones; `meshfit.save_weights(engine, path, ema=True)` saves the average).
    """

    fusion_safe = True  # no batch hooks; the average is pure math inside the step

    def __init__(
        self,
        decay: float = 0.999,
        start_step: int = 0,
        use_for_eval: bool = True,
        swap_at_end: bool = False,
    ):
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay < 1:
            raise ValueError(
                f"EMA(decay={decay!r}): decay must be a number strictly between 0 and 1, the "
                "weight the old average keeps at each update, e.g. EMA(decay=0.999)."
            )
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(
                f"EMA(start_step={start_step!r}): start_step must be an integer >= 0, the number "
                "of updates during which the average just follows the parameters (0: average "
                "from the first update)."
            )
        self.decay, self.start_step = float(decay), start_step
        self.use_for_eval, self.swap_at_end = bool(use_for_eval), bool(swap_at_end)
        self._finished = False

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY  # where save_weights/load_weights(ema=True) find the average

    # ---------------------------------------------------------------- in the step
    def init(self, params: Any) -> dict[str, Any]:
        # `p + 0`, not `p`: a jit output that forwards its input could share the parameters'
        # buffers, and both are donated to the step.
        return {
            "params": jax.tree.map(lambda p: p + jnp.zeros((), p.dtype), params),
            "count": jnp.zeros((), jnp.int32),
        }

    def after_update(self, state: dict[str, Any], params: Any, ctx: StepContext) -> dict[str, Any]:
        decay = self.decay
        averaged = jax.tree.map(
            lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state["params"], params
        )
        if self.start_step:  # the first `start_step` updates: follow the parameters
            follow = state["count"] < self.start_step
            averaged = jax.tree.map(lambda a, p: jnp.where(follow, p, a), averaged, params)
        if ctx.param_shardings is not None:
            averaged = jax.lax.with_sharding_constraint(averaged, ctx.param_shardings)
        return {"params": averaged, "count": state["count"] + 1}

    def eval_params(self, state: dict[str, Any], params: Any) -> Any:
        return state["params"] if self.use_for_eval else params

    # ---------------------------------------------------------------- host side
    def setup(self, engine: Engine) -> None:
        others = [cb for cb in engine.callbacks if isinstance(cb, EMA)]
        if len(others) > 1:
            raise ValueError(
                f"Engine got {len(others)} EMA callbacks ({', '.join(map(repr, others))}); a run "
                "keeps one moving average. Pass a single EMA(...)."
            )
        self._finished = False

    def on_fit_end(self, engine: Engine) -> None:
        self._finished = True  # teardown swaps only after a fit that ended normally

    def teardown(self, engine: Engine) -> None:
        # After the engine wrote the trained weights back into the module.
        if self.swap_at_end and self._finished and engine.module is not None:
            extra = getattr(engine.state, "extra", None) or {}
            if self.state_key in extra:
                nnx.update(engine.module, extra[self.state_key]["params"])
        self._finished = False

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, start_step={self.start_step}, "
            f"use_for_eval={self.use_for_eval}, swap_at_end={self.swap_at_end})"
        )
