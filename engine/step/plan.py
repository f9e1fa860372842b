"""Before the loop: the train state's plan (structure, layout) and the state itself.

`plan_state` knows everything about the state without allocating it (fit, `find_batch_size` and
`auto` placement use it); `build_state` creates it laid out by the strategy. The jitted step
over the state's flat leaves is built in `meshfit.engine.step.build`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from meshfit.engine.hooks import StepTransform
from meshfit.engine.module import overrides
from meshfit.engine.state import TrainState
from meshfit.engine.step.build import split_module
from meshfit.engine.step.optimizer import OptimizerConfig, parse_optimizers
from meshfit.strategies.base import Layout, Strategy

ModuleOrFactory = nnx.Module | Callable[[], nnx.Module]


class StatePlan(NamedTuple):
    """A run's train state before it exists: what `init` builds, its shape and its layout."""

    graphdef: nnx.GraphDef
    params: nnx.State  # real arrays for a module instance, abstract for a factory
    rest: nnx.State
    tx: optax.GradientTransformation
    init: Callable[[nnx.State, nnx.State], TrainState]
    abstract: TrainState
    shardings: TrainState
    layout: Layout
    lr_schedule: Callable[[Any], Any] | None = None  # from configure_optimizers' dict form


def make_optimizer(
    module: nnx.Module, clip_val: float | None = None, clip_algorithm: str = "norm"
) -> OptimizerConfig:
    """`module.configure_optimizers()`, checked, with gradient clipping chained in front of
    the optimizer (the schedule, if the dict form named one, is kept beside it)."""
    try:
        out = module.configure_optimizers()
    except NotImplementedError:
        out = None
    config = parse_optimizers(type(module).__name__, out)
    if clip_val is None:
        return config
    clip = optax.clip_by_global_norm(clip_val) if clip_algorithm == "norm" else optax.clip(clip_val)
    return config._replace(tx=optax.chain(clip, config.tx))


def plan_state(
    module_or_factory: ModuleOrFactory,
    strategy: Strategy,
    transforms: Sequence[StepTransform] = (),
    clip_val: float | None = None,
    clip_algorithm: str = "norm",
) -> StatePlan:
    """Template module, optimizer, `init(params, rest)`, abstract state and its layout under
    `strategy` (set up). Allocates nothing and changes nothing."""
    is_factory = not isinstance(module_or_factory, nnx.Module)
    if is_factory and not callable(module_or_factory):
        raise TypeError(
            "fit() expects a TrainModule instance or a zero-argument factory returning one, "
            f"got {type(module_or_factory).__name__}."
        )
    # Partition annotations are metadata read by the strategy's rules, not eager placements
    # (so logical names need no mesh axis of their own).
    with nnx.use_eager_sharding(False):
        template = nnx.eval_shape(module_or_factory) if is_factory else module_or_factory
    with jax.set_mesh(strategy.mesh), nnx.use_eager_sharding(False):
        if not callable(getattr(template, "training_step", None)) or (
            not overrides(template, "training_step") and hasattr(type(template), "log")
        ):
            raise TypeError(
                f"{type(template).__name__} has no training_step. Subclass meshfit.TrainModule "
                "and define `def training_step(self, batch): ... return loss`."
            )
        optimizer = make_optimizer(template, clip_val, clip_algorithm)
        tx = optimizer.tx
        graphdef, params, rest = split_module(template)

        def init(params, rest):
            extra = {t.state_key: t.init(params) for t in transforms}
            return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), extra)

        abstract = jax.eval_shape(init, params, rest)
        layout = strategy.layout(abstract)
    return StatePlan(
        graphdef, params, rest, tx, init, abstract, layout.shardings, layout, optimizer.lr_schedule
    )


def relayout(plan: StatePlan, strategy: Strategy) -> StatePlan:
    """The same plan laid out by another strategy (e.g. the one "auto" chose)."""
    with jax.set_mesh(strategy.mesh), nnx.use_eager_sharding(False):
        layout = strategy.layout(plan.abstract)
    return plan._replace(shardings=layout.shardings, layout=layout)


def build_state(
    plan: StatePlan, module_or_factory: ModuleOrFactory, mesh: jax.sharding.Mesh
) -> tuple[TrainState, Any]:
    """The train state laid out by `plan.shardings`, and the compiled init for a factory (which
    is built directly sharded: no device ever holds the whole model) or None for an instance."""
    with jax.set_mesh(mesh), nnx.use_eager_sharding(False):
        if not isinstance(module_or_factory, nnx.Module):

            def build():
                _, params, rest = split_module(module_or_factory())
                return plan.init(params, rest)

            init_compiled = jax.jit(build, out_shardings=plan.shardings).lower().compile()
            return init_compiled(), init_compiled
        params, rest = jax.device_put(
            (plan.params, plan.rest),
            (plan.shardings.params, plan.shardings.rest),
            may_alias=False,
        )
        return jax.jit(plan.init, out_shardings=plan.shardings)(params, rest), None
