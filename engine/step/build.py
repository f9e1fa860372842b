"""Building the steps: the pure `(state, batch) -> (state, metrics)` train step with the in-step
transforms composed inside, its jitted form over the state's flat leaves, and the eval step.

The module is split once (graphdef + state); each step merges a copy inside the traced
function, runs the user's method, and returns the new non-parameter state as output, so
Dropout/BatchNorm work under `jax.grad` and nothing is traced more than once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from meshfit.engine.hooks import StepContext, StepTransform
from meshfit.engine.module import MetricMeta, log_scope
from meshfit.engine.state import TrainState
from meshfit.engine.step.optimizer import accepts_value
from meshfit.strategies.base import Strategy

PRECISIONS = {"fp32": None, "32": None, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def split_module(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """graphdef, parameters, and every other variable of `module`."""
    return nnx.split(module, nnx.Param, ...)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves of `tree` to `dtype` (no-op when dtype is None)."""
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


def _run_method(graphdef, params, rest, batch, method: str, train: bool, meta):
    module = nnx.merge(graphdef, params, rest, copy=True)
    if train:
        module.train()
    else:
        module.eval()
    with log_scope(meta) as scope:
        out = getattr(module, method)(batch)
    _, _, new_rest = split_module(module)
    return out, scope.values, new_rest


def extract_loss(out: Any) -> jax.Array:
    """The scalar loss from what `training_step` returned, or a clear error."""
    if isinstance(out, dict):
        if "loss" not in out:
            raise ValueError(
                f"training_step returned a dict without a 'loss' entry (keys: {sorted(out)}). "
                "Return the scalar loss, or a dict holding it under 'loss'."
            )
        out = out["loss"]
    if out is None:
        raise ValueError("training_step returned None. Return the scalar loss to minimise.")
    loss = jnp.asarray(out)
    if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            f"training_step must return a scalar floating loss, got an array of shape "
            f"{tuple(loss.shape)} and dtype {loss.dtype}. Reduce it, e.g. `return loss.mean()`."
        )
    return loss.astype(jnp.float32)


def _wrap_grad(t: StepTransform, grad_fn: Callable, ctx: StepContext) -> Callable:
    """`t.wrap_grad_fn(grad_fn, ctx)`, or `(grad_fn)` for a transform written before contexts."""
    params = inspect.signature(t.wrap_grad_fn).parameters
    return t.wrap_grad_fn(grad_fn, ctx) if len(params) >= 2 else t.wrap_grad_fn(grad_fn)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    transforms: Sequence[StepTransform],
    meta: dict[str, MetricMeta],
    *,
    compute_dtype: Any = None,
    context: Callable[[], Any] = contextlib.nullcontext,
    step_context: StepContext | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure training step, composing the in-step transforms around one optimizer update.

    `meta` (this step's own dict) collects how each logged metric is combined while the step
    is traced: the transforms' declared reductions, then what `self.log` records.
    """
    meta["loss"] = MetricMeta("mean", prog_bar=True)
    for t in transforms:
        for name, reduce in t.metric_reductions.items():
            meta.setdefault(name, MetricMeta(reduce))
    base = step_context or StepContext()
    ctx = dataclasses.replace(base, metric_reduce=lambda name: meta.get(name, MetricMeta()).reduce)
    pass_value = accepts_value(tx)  # e.g. reduce_on_plateau: the update needs the loss

    def loss_fn(params, rest, batch, extra):
        out, logs, new_rest = _run_method(
            graphdef,
            cast_floating(params, compute_dtype),
            rest,
            cast_floating(batch, compute_dtype),
            "training_step",
            True,
            meta,
        )
        loss = extract_loss(out)
        objective = loss
        for t in transforms:
            objective = t.scale_loss(objective, extra[t.state_key])
        return objective, ({**logs, "loss": loss}, new_rest)

    def train_step(state: TrainState, batch: Any):
        with context():
            grad_fn = functools.partial(jax.grad(loss_fn, has_aux=True), extra=state.extra)
            for t in transforms:
                grad_fn = _wrap_grad(t, grad_fn, ctx)
            grads, (logs, rest) = grad_fn(state.params, state.rest, batch)

        extra, ok = dict(state.extra), None
        for t in transforms:
            grads, extra[t.state_key], t_ok = t.process_grads(
                grads, state.extra[t.state_key], logs["loss"]
            )
            if t_ok is not None:
                ok = t_ok if ok is None else ok & t_ok
            logs.update(t.metrics(extra[t.state_key]))

        def update(state: TrainState) -> TrainState:
            if pass_value:
                updates, opt_state = tx.update(
                    grads, state.opt_state, state.params, value=logs["loss"]
                )
            else:
                updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            new_extra = {
                t.state_key: t.after_update(extra[t.state_key], params, ctx) for t in transforms
            }
            return TrainState(state.step + 1, params, rest, opt_state, {**extra, **new_extra})

        if ok is None:
            return update(state), logs
        # A transform may veto the update: keep everything but the transforms' own states.
        # lax.cond, not a select over the state: buffers still update in place (a select cost
        # ~30% of a small MLP's step on CPU) and a skipped step runs no optimizer math.
        return jax.lax.cond(ok, update, lambda s: s.replace(extra=extra), state), logs

    return train_step


def jit_train_step(
    plan: Any,
    strategy: Strategy,
    transforms: Sequence[StepTransform],
    meta: dict[str, MetricMeta],
    precision: str,
    batch_example: Any,
) -> Any:
    """The pure step `(state leaves, batch) -> (state leaves, metrics)` for a `StatePlan`,
    jitted with the strategy's layouts and the leaves donated (lower it with leaves and a
    batch to compile). `meta` fills with the metrics' reductions when the step is traced.

    The step takes the state's flat leaves rather than the `TrainState`: flattening and
    rebuilding its nnx Variables on every call costs the host ~0.1 ms a step.
    """
    train_step = leaves_train_step(plan, strategy, transforms, meta, precision)
    treedef = jax.tree.structure(plan.abstract)
    state_shardings = treedef.flatten_up_to(plan.shardings)
    batch_shardings = jax.tree.map(lambda x: strategy.batch_sharding(x.ndim), batch_example)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, strategy.replicated()),
        donate_argnums=0,
    )


def leaves_train_step(
    plan: Any,
    strategy: Strategy,
    transforms: Sequence[StepTransform],
    meta: dict[str, MetricMeta],
    precision: str,
) -> Callable:
    """The pure step over the state's flat leaves, `(leaves, batch) -> (leaves, metrics)`
    (unjitted: `jit_train_step` jits it; the fused dispatch scans it)."""
    treedef = jax.tree.structure(plan.abstract)
    ctx = StepContext(
        mesh=strategy.mesh,
        batch_sharding=strategy.batch_sharding,
        param_shardings=plan.shardings.params,
    )
    step = make_train_step(
        plan.graphdef,
        plan.tx,
        transforms,
        meta,
        compute_dtype=PRECISIONS[precision],
        context=strategy.step_context,
        step_context=ctx,
    )

    def train_step(leaves, batch):  # the name profiles show: PjitFunction(train_step)
        state, metrics = step(treedef.unflatten(leaves), batch)
        return treedef.flatten_up_to(state), metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    meta: dict[str, MetricMeta],
    *,
    compute_dtype: Any = None,
    context: Callable[[], Any] = contextlib.nullcontext,
    method: str = "validation_step",
    loss_name: str = "val_loss",
) -> Callable[[nnx.State, nnx.State, Any], dict[str, jax.Array]]:
    """The pure evaluation step: metrics logged by `method` (`validation_step`, `test_step`),
    plus its returned scalar as `loss_name` (`val_loss`, `test_loss`)."""

    def eval_step(params, rest, batch):
        with context():
            out, logs, _ = _run_method(
                graphdef,
                cast_floating(params, compute_dtype),
                rest,
                cast_floating(batch, compute_dtype),
                method,
                False,
                meta,
            )
        if isinstance(out, dict) and "loss" in out:
            out = out["loss"]
        if out is not None and loss_name not in logs and jnp.ndim(out) == 0:
            logs[loss_name] = jnp.asarray(out, jnp.float32)
            meta.setdefault(loss_name, MetricMeta("mean", prog_bar=True))
        return logs

    return eval_step


def make_predict_step(
    graphdef: nnx.GraphDef,
    *,
    compute_dtype: Any = None,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> Callable[[nnx.State, nnx.State, Any], Any]:
    """The pure prediction step: `predict_step(batch)` in eval mode, a pytree of per-row arrays."""

    def predict_step(params, rest, batch):
        with context():
            out, _, _ = _run_method(
                graphdef,
                cast_floating(params, compute_dtype),
                rest,
                cast_floating(batch, compute_dtype),
                "predict_step",
                False,
                {},
            )
        return out

    return predict_step
