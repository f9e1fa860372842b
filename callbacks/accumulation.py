"""`GradientAccumulation`: k micro-batches per optimizer update, fused into one compiled step.

Lightning semantics: `Engine(batch_size=B)` is the micro-batch; each optimizer update consumes
`k` consecutive batches of `B` (the data loader groups them into one window, see
`meshfit.data.MicroBatchWindows`); `max_steps` and the optimizer's step counter (so any
learning-rate schedule) count updates. The k forward/backward passes run as a `lax.scan`
inside the single compiled step: one dispatch per update, activation memory of one micro-batch.

Order inside the step (see `StepTransform`)::

    accumulate (this transform, scale_loss applied per micro-batch) -> unscale (loss scaling)
    -> clip (Engine(gradient_clip_val=...), the head of the optimizer chain)
    -> skip the update if anything is non-finite -> optimizer
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshfit.engine.data import MicroBatches
from meshfit.engine.hooks import GradFn, StepContext, StepTransform


class GradientAccumulation(StepTransform):
    """Average gradients over `steps` micro-batches before each optimizer update.

    Gradients are averaged over the real number of examples: a short final window of an epoch
    (fewer than `steps` micro-batches left) is normalised by its own count. Logged metrics are
    combined over the window's micro-batches with their own `reduce` (mean, sum, max, min).
    Micro-batches are taken strided from the step's batch, so every row stays on its device,
    and the gradient accumulator is kept in the parameters' layout (sharded under FSDP).
    Other state (BatchNorm statistics, RNG counts) is carried from micro-batch to micro-batch.

    The step's batch is a `meshfit.data.MicroBatches(data, count)` window (what
    `on_train_batch_start/end` receive too): `data` holds the k micro-batches interleaved.
    """

    def __init__(self, steps: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"GradientAccumulation(steps={steps!r}): steps must be a positive integer, the "
                "number of batches per optimizer update, e.g. GradientAccumulation(steps=4)."
            )
        self.steps = steps
        self.micro_batches = steps

    def wrap_grad_fn(self, grad_fn: GradFn, ctx: StepContext) -> GradFn:
        k = self.steps
        if k == 1:
            return grad_fn

        def constrain_micro(x: jax.Array) -> jax.Array:
            """Keep micro-batch rows on their devices: (k, B, ...) sharded on dim 1 like B."""
            if ctx.batch_sharding is None or x.ndim < 2:
                return x
            spec = P(None, *ctx.batch_sharding(x.ndim - 1).spec)
            return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))

        def constrain_like_params(tree: Any) -> Any:
            if ctx.param_shardings is None:
                return tree
            return jax.lax.with_sharding_constraint(tree, ctx.param_shardings)

        def split(x: jax.Array) -> jax.Array:  # strided: row r*k + j -> micro-batch j, row r
            if x.ndim == 0:
                return jnp.broadcast_to(x, (k,))
            if x.shape[0] % k:
                raise ValueError(
                    f"GradientAccumulation({k}) got a batch leaf with {x.shape[0]} rows, not a "
                    f"multiple of {k}. Feed the data through Engine.fit, which groups batches."
                )
            x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
            return constrain_micro(jnp.swapaxes(x, 0, 1))

        def accumulated(params: Any, rest: Any, batch: Any) -> tuple[Any, Any]:
            if isinstance(batch, MicroBatches):
                data, count = batch.data, jnp.asarray(batch.count, jnp.int32)
            else:
                data, count = batch, jnp.asarray(k, jnp.int32)
            micro = jax.tree.map(split, data)
            acc0 = constrain_like_params(
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            )

            def body(carry, xs):
                acc, rest = carry
                j, mb = xs
                grads, (logs, new_rest) = grad_fn(params, rest, mb)
                valid = j < count  # padding micro-batches of a short window add nothing
                acc = jax.tree.map(
                    lambda a, g: a + jnp.where(valid, g.astype(jnp.float32), 0.0), acc, grads
                )
                rest = jax.tree.map(lambda n, o: _keep(valid, n, o), new_rest, rest)
                return (constrain_like_params(acc), rest), logs

            (acc, rest), logs = jax.lax.scan(body, (acc0, rest), (jnp.arange(k), micro))
            denom = count.astype(jnp.float32)
            grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), acc, params)
            valid = jnp.arange(k) < count
            logs = {name: _combine(v, valid, ctx.metric_reduce(name)) for name, v in logs.items()}
            return grads, (logs, rest)

        return accumulated


def _combine(values: jax.Array, valid: jax.Array, reduce: str) -> jax.Array:
    """One metric over the valid micro-batches of a window, combined with its `reduce`."""
    if reduce == "sum":
        return jnp.sum(jnp.where(valid, values, 0))
    if reduce == "max":
        return jnp.max(jnp.where(valid, values, -jnp.inf))
    if reduce == "min":
        return jnp.min(jnp.where(valid, values, jnp.inf))
    return jnp.sum(jnp.where(valid, values, 0)) / jnp.sum(valid)


def _keep(valid: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` if the micro-batch is real, else `old` (works for PRNG keys and counters too)."""
    if new.dtype != old.dtype and not jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
        new = new.astype(old.dtype)
    return jax.lax.select(valid, new, old)
