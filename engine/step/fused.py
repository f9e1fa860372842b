"""The fused dispatch: K optimizer steps in one compiled call (`lax.scan` over the step), with
the logged metrics accumulated on the device in the carry.

Two batch sources: stacked host batches (leading axis K, placed once per dispatch) or data
resident on the device, each step's rows gathered through the epoch's permutation. The scan
body is the same pure step as one dispatch per step, so K steps are bitwise equal to K calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from meshfit.engine.module import MetricMeta
from meshfit.strategies.base import Strategy

COUNT = "__steps__"  # the accumulator's number of steps (the weight of every "mean")


def empty_metrics(meta: dict[str, MetricMeta], shapes: dict[str, Any]) -> dict[str, jax.Array]:
    """The accumulator before any step: 0 for sums and means, -inf/+inf for max/min."""
    start = {"mean": 0.0, "sum": 0.0, "max": -jnp.inf, "min": jnp.inf}
    out = {
        name: jnp.full((), start[meta.get(name, MetricMeta()).reduce], jnp.float32)
        for name in shapes
    }
    out[COUNT] = jnp.zeros((), jnp.float32)
    return out


def accumulate(acc: dict, metrics: dict, meta: dict[str, MetricMeta]) -> dict:
    """`acc` with one more step's metrics (float32; mean as a sum divided by the count on the
    host; NaN wins max and min, as NumPy)."""
    out = dict(acc)
    for name, value in metrics.items():
        v = jnp.asarray(value, jnp.float32)
        reduce = meta.get(name, MetricMeta()).reduce
        if reduce in ("mean", "sum"):
            out[name] = acc[name] + v
        else:
            out[name] = (jnp.maximum if reduce == "max" else jnp.minimum)(acc[name], v)
    out[COUNT] = acc[COUNT] + 1.0
    return out


def stacked_sharding(strategy: Strategy, ndim: int) -> NamedSharding:
    """A stacked batch leaf (K, rows, ...): the batch's sharding behind a leading K axis."""
    base = strategy.batch_sharding(ndim - 1)
    return NamedSharding(base.mesh, PartitionSpec(None, *base.spec))


class FusedStep:
    """Jitted K-step dispatches of `step` (`(leaves, batch) -> (leaves, metrics)`), one per K,
    built on first use: `(leaves, acc, xs) -> (leaves, acc, per-step metrics)`.

    `xs` is a stacked batch (host source) or `(data, perm, start)` (device source: step j
    takes the rows `perm[(start + j) * rows : (start + j + 1) * rows]` of `data`)."""

    def __init__(
        self,
        step: Callable,
        meta: dict[str, MetricMeta],
        strategy: Strategy,
        state_shardings: Any,
        rows: int | None = None,
    ):
        self.step, self.meta, self.strategy = step, meta, strategy
        self.state_shardings, self.rows = state_shardings, rows
        self.jitted: dict[tuple, Any] = {}

    def __call__(self, k: int, leaves, acc, xs):
        return self._get(k, xs)(leaves, acc, xs)

    def compile(self, k: int, leaves, acc, xs) -> Any:
        """The compiled K-step dispatch (for its memory and FLOPs analyses)."""
        return self._get(k, xs).lower(leaves, acc, xs).compile()

    def _get(self, k: int, xs: Any) -> Any:
        key = (k, jax.tree.structure(xs))
        fn = self.jitted.get(key)
        if fn is None:
            fn = self.jitted[key] = self._jit(k, xs)
        return fn

    @property
    def sizes(self) -> list[int]:
        """The K values compiled so far."""
        return sorted({k for k, _ in self.jitted})

    def _batch(self, xs: Any, j: jax.Array) -> Any:
        if self.rows is None:
            return jax.tree.map(lambda x: x[j], xs)
        data, perm, start = xs
        idx = jax.lax.dynamic_slice(perm, ((start + j) * self.rows,), (self.rows,))
        return jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x[idx], self.strategy.batch_sharding(x.ndim)
            ),
            data,
        )

    def _jit(self, k: int, xs: Any) -> Any:
        meta, step = self.meta, self.step

        def fused_train_step(leaves, acc, xs):  # the name profiles show
            def body(carry, j):
                leaves, acc = carry
                leaves, metrics = step(leaves, self._batch(xs, j))
                return (leaves, accumulate(acc, metrics, meta)), metrics

            (leaves, acc), per_step = jax.lax.scan(body, (leaves, acc), jnp.arange(k))
            return leaves, acc, per_step

        replicated = self.strategy.replicated()
        if self.rows is None:
            xs_shardings = jax.tree.map(lambda x: stacked_sharding(self.strategy, x.ndim), xs)
        else:
            data = jax.tree.map(lambda x: x.sharding, xs[0])
            xs_shardings = (data, replicated, replicated)
        return jax.jit(
            fused_train_step,
            in_shardings=(self.state_shardings, replicated, xs_shardings),
            out_shardings=(self.state_shardings, replicated, replicated),
            donate_argnums=(0, 1),
        )
