"""The bottom layer: host hooks (`Callback`) and in-step transforms (`StepTransform`).

Everything else imports these; they import nothing of meshfit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_dispatch_end",
    "on_log",
    "on_validation_start",
    "on_validation_end",
    "on_train_epoch_end",
    "on_fit_end",
    "on_test_start",
    "on_test_batch_end",
    "on_test_end",
    "on_predict_start",
    "on_predict_batch_end",
    "on_predict_end",
    "on_exception",
    "teardown",
)


class Callback:
    """Host-side hooks around the fit loop, each receiving the engine first.

    Order within `Engine.fit`::

        setup -> on_fit_start
        for each epoch:
            on_train_epoch_start
            for each batch:
                on_train_batch_start -> (compiled step) -> on_train_batch_end
                on_log                                    (every log_every_n_steps)
                on_validation_start -> on_validation_end  (every val_every_n_steps, if set)
            on_validation_start -> on_validation_end      (end of epoch, by default)
            on_train_epoch_end
        on_fit_end
        on_exception   (only when the loop raised)
        teardown       (always, last)

    `Engine.test`: on_test_start -> on_test_batch_end (each batch) -> on_log -> on_test_end.
    `Engine.predict`: on_predict_start -> on_predict_batch_end (each batch) -> on_predict_end.

    Hooks run between steps in Python. They must not read device values (which waits for the
    device) except at their own cadence: `outputs` in `on_train_batch_end` are device arrays.
    Only the hooks a callback overrides are called.

    Fused dispatch (`Engine(steps_per_dispatch=...)`) runs several steps in one compiled call.
    A callback that overrides `on_train_batch_start`/`on_train_batch_end` must set
    `fusion_safe = True` to allow it (otherwise the run uses one step per dispatch): its batch
    hooks then run for each step of a dispatch (the start hooks before it, the end hooks after
    it) with `engine.global_step`/`batch_idx` of that step, that step's `outputs`, and `batch`
    as that step's shapes (`jax.ShapeDtypeStruct`s). `next_host_step` names the next step at
    which the callback must see the live state (a dispatch then ends exactly there).
    """

    #: The batch hooks are correct when called after a fused dispatch (see above).
    fusion_safe: bool = False
    #: An `on_train_epoch_end` override reads the epoch's metrics (the engine then logs the
    #: training window at each epoch's end, which waits for the device); False if it does not.
    epoch_end_reads_metrics: bool = True
    #: Its `on_log` and `on_train_batch_end` only observe: they never stop the run, save, or
    #: change later steps. When every such hook observes only, a log step's host work runs
    #: once the next dispatch is queued, so the device does not wait for the host at a log.
    observes_only: bool = False

    def next_host_step(self, engine: Engine) -> int | None:
        """The next global step (> engine.global_step) after which this callback must see the
        state, or None (no such need beyond the log/validation/checkpoint cadences)."""
        return None

    def setup(self, engine: Engine) -> None: ...
    def on_fit_start(self, engine: Engine) -> None: ...
    def on_train_epoch_start(self, engine: Engine) -> None: ...
    def on_train_batch_start(self, engine: Engine, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(
        self, engine: Engine, outputs: dict[str, jax.Array], batch: Any, batch_idx: int
    ) -> None: ...
    def on_train_dispatch_end(self, engine: Engine, steps: int) -> None:
        """Once per dispatch, right after its `steps` optimizer steps ran (`engine.global_step`
        is the last of them), before that step's log: per-dispatch work (a progress bar's
        advance) costs no Python per step, and needs no `fusion_safe`."""

    def on_log(self, engine: Engine, metrics: dict[str, float]) -> None:
        """Freshly reduced metrics (train window or a validation pass), as Python floats."""

    def on_validation_start(self, engine: Engine) -> None: ...
    def on_validation_end(self, engine: Engine) -> None: ...
    def on_train_epoch_end(self, engine: Engine) -> None: ...
    def on_fit_end(self, engine: Engine) -> None: ...
    def on_test_start(self, engine: Engine) -> None: ...
    def on_test_batch_end(
        self, engine: Engine, outputs: dict[str, jax.Array], batch: Any, batch_idx: int
    ) -> None: ...
    def on_test_end(self, engine: Engine) -> None: ...
    def on_predict_start(self, engine: Engine) -> None: ...
    def on_predict_batch_end(
        self, engine: Engine, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """`outputs`: this process's rows of the batch's predictions (NumPy, padding dropped);
        `engine.predict_rows` is their global row range [start, stop)."""

    def on_predict_end(self, engine: Engine) -> None: ...
    def on_exception(self, engine: Engine, exception: BaseException) -> None: ...
    def teardown(self, engine: Engine) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to save in checkpoints (resumable callbacks override)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @property
    def state_key(self) -> str:
        """Key of this callback's entry in checkpoints; unique per class by default."""
        return type(self).__name__


def overridden_hooks(callback: Callback) -> list[str]:
    """Hook names whose implementation differs from the no-op in `Callback`."""
    return [h for h in HOOKS if getattr(type(callback), h) is not getattr(Callback, h)]


GradFn = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class StepContext:
    """What an in-step transform may know while the step is traced, handed to it as an argument.

    - `mesh`, `batch_sharding(ndim)`: where a batch lives (e.g. to keep micro-batch rows on their
      devices);
    - `param_shardings`: a pytree like the parameters, of their shardings (e.g. to keep an
      accumulator or an average laid out like them);
    - `metric_reduce(name)`: how a logged metric combines across steps ("mean", "sum", ...).
    """

    mesh: Any = None
    batch_sharding: Callable[[int], Any] | None = None
    param_shardings: Any = None
    metric_reduce: Callable[[str], str] = lambda name: "mean"


class StepTransform(Callback):
    """A callback that changes the math of the step (optax-style: pure functions over state).

    Its pieces are composed inside the single compiled step, in this order::

        loss -> scale_loss -> grad (wrapped by wrap_grad_fn, e.g. accumulation)
             -> process_grads (unscale, finiteness) -> skip-if-not-ok -> optimizer
             -> after_update (e.g. a moving average of the new parameters)

    Outside the step, `eval_params` may hand evaluation other weights than the trained ones.

    Its state, from `init(params)`, lives in `engine.state.extra[self.state_key]`, so it is
    donated, sharded, checkpointed and restored with everything else. A transform keeps no
    reference to the engine: what it needs at trace time comes as a `StepContext`.
    """

    #: Batches of `batch_size` consumed per optimizer update (gradient accumulation sets it).
    micro_batches: int = 1
    #: How the metrics from `metrics()` combine across the steps of a log window, by name
    #: (default "mean"), e.g. {"loss_scale": "min"}.
    metric_reductions: dict[str, str] = {}  # noqa: RUF012 (read-only class default)

    def init(self, params: Any) -> Any:
        return ()

    def scale_loss(self, loss: jax.Array, state: Any) -> jax.Array:
        """The objective differentiated (e.g. loss * scale)."""
        return loss

    def wrap_grad_fn(self, grad_fn: GradFn, ctx: StepContext) -> GradFn:
        """How gradients are computed: `grad_fn(params, rest, batch) -> (grads, aux)`."""
        return grad_fn

    def process_grads(
        self, grads: Any, state: Any, loss: jax.Array | None = None
    ) -> tuple[Any, Any, jax.Array | None]:
        """Post-process gradients (given the step's float32 loss); return (grads, new_state, ok).
        ok=False skips the update."""
        return grads, state, None

    def after_update(self, state: Any, params: Any, ctx: StepContext) -> Any:
        """The transform's state after an applied optimizer update, given the new parameters
        (a skipped update skips this too)."""
        return state

    def metrics(self, state: Any) -> dict[str, jax.Array]:
        """Values logged every step from the transform's new state."""
        return {}

    def eval_params(self, state: Any, params: Any) -> Any:
        """The parameters validation, test and predict use, given this transform's state and
        the trained parameters (e.g. a moving average of them); by default the trained ones."""
        return params


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every floating leaf of `tree` is finite."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
