"""`TrainModule`: a Flax NNX module that knows how to train itself, and `self.log`."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshfit.engine.hparams import record_init_arguments

REDUCTIONS = ("mean", "sum", "max", "min")


@dataclass(frozen=True)
class MetricMeta:
    """How a logged value is combined over the global batch and over steps (static, trace-time)."""

    reduce: str = "mean"
    prog_bar: bool = False


@dataclass
class LogScope:
    """Collects the values logged during one traced call of a step method."""

    values: dict[str, jax.Array] = field(default_factory=dict)
    meta: dict[str, MetricMeta] = field(default_factory=dict)


_SCOPE: contextvars.ContextVar[LogScope | None] = contextvars.ContextVar(
    "meshfit_log_scope", default=None
)


@contextlib.contextmanager
def log_scope(meta: dict[str, MetricMeta] | None = None) -> Iterator[LogScope]:
    """Route `self.log` calls into a fresh scope; `meta` (if given) is shared across scopes."""
    scope = LogScope(meta=meta if meta is not None else {})
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def reduce_array(value: jax.Array, reduce: str) -> jax.Array:
    """Reduce every element of `value` with `reduce` to a float32 scalar."""
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.float32)
    op = {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max, "min": jnp.min}[reduce]
    return op(value).astype(jnp.float32)


class TrainModule(nnx.Module):
    """A Flax NNX module with a `training_step`; subclass it and hand it to `Engine.fit`.

    Override `training_step(batch)` (returns a scalar loss, or a dict holding `"loss"`),
    optionally `validation_step(batch)` / `test_step(batch)` / `predict_step(batch)`, and `configure_optimizers()` (returns an optax
    transformation). Inside either step, `self.log(name, value)` records a metric.

    The constructor's arguments are recorded as the run's hyperparameters (plain values only;
    `nnx.Rngs` and submodules are skipped); list names to leave out in `hparams_ignore`.
    """

    hparams_ignore: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        record_init_arguments(cls)

    def training_step(self, batch: Any) -> jax.Array | dict[str, jax.Array]:
        raise NotImplementedError

    def validation_step(self, batch: Any) -> Any:
        return None

    def test_step(self, batch: Any) -> Any:
        """Like `validation_step`, run by `Engine.test`; a returned scalar is `test_loss`."""
        return None

    def predict_step(self, batch: Any) -> Any:
        """Per-row outputs (a pytree of arrays with a leading row axis) for `Engine.predict`;
        by default `self(x)`, x being the batch or its first element for a tuple/list."""
        x = batch[0] if isinstance(batch, tuple | list) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        raise NotImplementedError

    def log(self, name: str, value: Any, prog_bar: bool = False, reduce: str = "mean") -> None:
        """Log a metric from inside `training_step` / `validation_step` (works under `jit`).

        `value` may be a scalar or an array over the global batch; it is reduced with `reduce`
        (mean, sum, max or min) inside the compiled step, and combined the same way across the
        steps between two logs, so logging never needs a host-side collective.
        """
        scope = _SCOPE.get()
        if scope is None:
            raise RuntimeError(
                f"self.log({name!r}, ...) was called outside a step. Metrics can only be logged "
                "from training_step or validation_step while an Engine runs them."
            )
        if not isinstance(name, str) or not name:
            raise TypeError(f"self.log expects a non-empty string name, got {name!r}.")
        if reduce not in REDUCTIONS:
            raise ValueError(
                f"self.log({name!r}, ..., reduce={reduce!r}): reduce must be one of {REDUCTIONS}."
            )
        scope.values[name] = reduce_array(value, reduce)
        scope.meta[name] = MetricMeta(reduce=reduce, prog_bar=prog_bar)


def overrides(module: Any, method: str) -> bool:
    """True when `module`'s class defines `method` itself rather than inheriting TrainModule's."""
    impl = getattr(type(module), method, None)
    return impl is not None and impl is not getattr(TrainModule, method, None)
