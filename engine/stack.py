"""`Stack`: N identical layers with parameters stacked on a leading layer axis.

By default a Stack runs as one `lax.scan` over its layers (compiled once, whatever N). A
strategy can take over its execution while a step is traced by installing an executor
(`stack_executor`); the pipeline strategy runs the layers across a `stage` mesh axis this way.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

from meshfit.engine.remat import Remat, resolve_remat

#: Variable metadata key marking a stacked variable; its value is the number of layers.
STACK_METADATA = "meshfit_stack"

Executor = Callable[["Stack", jax.Array], jax.Array]

_EXECUTOR: contextvars.ContextVar[Executor | None] = contextvars.ContextVar(
    "meshfit_stack_executor", default=None
)


@contextlib.contextmanager
def stack_executor(executor: Executor | None) -> Iterator[None]:
    """Run every `Stack` called inside this context with `executor(stack, x)`."""
    token = _EXECUTOR.set(executor)
    try:
        yield
    finally:
        _EXECUTOR.reset(token)


def current_executor() -> Executor | None:
    """The executor installed by the active strategy, or None (run as a scan)."""
    return _EXECUTOR.get()


def stack_size(variable: Any) -> int | None:
    """The number of layers of the Stack that owns `variable` (None if it is not stacked)."""
    if not isinstance(variable, nnx.Variable):
        return None
    return variable.get_metadata().get(STACK_METADATA)


def scan_layers(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    x: jax.Array,
    remat: Remat | None = None,
) -> tuple[jax.Array, nnx.State]:
    """Apply the stacked layers (leading axis of `params`/`rest`) to `x` in order, each layer
    rematerialised in the backward pass under `remat` (None: activations are stored).

    Returns the output and the layers' updated non-parameter state (RNG counts, statistics).
    """
    length = jax.tree.leaves(params)[0].shape[0] if jax.tree.leaves(params) else None

    def body(h, layer_state):
        layer = nnx.merge(graphdef, *layer_state)
        out = layer(h)
        if not hasattr(out, "shape") or out.shape != h.shape or out.dtype != h.dtype:
            got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
            raise ValueError(
                f"A Stack layer must map an array to an array of the same shape and dtype; it "
                f"got {tuple(h.shape)} {h.dtype} and returned {got[0]} {got[1]}. Keep the "
                "shape-changing parts (embedding, head) outside the Stack."
            )
        _, _, new_rest = nnx.split(layer, nnx.Param, ...)
        return out, new_rest

    if remat is not None:
        body = remat.wrap(body)
    return jax.lax.scan(body, x, (params, rest), length=length)


class Stack(nnx.Module):
    """`num_layers` copies of `make_layer(rngs)`, each initialised independently.

    Every parameter has a leading axis of size `num_layers` (NNX's `split_rngs` + `vmap`
    init). `stack(x)` applies the layers in order: a `scan` under data-parallel and sharded
    strategies, a pipelined schedule under `Pipeline`.

    `remat` recomputes each layer's activations in the backward pass instead of storing them:
    False (off), True (keep only each layer's input), a `jax.checkpoint_policies` name
    ("dots_saveable", "nothing_saveable", ...) or a policy function. Same numbers, less memory.
    """

    def __init__(
        self,
        make_layer: Callable[[nnx.Rngs], nnx.Module],
        num_layers: int,
        *,
        rngs,
        remat: bool | str | Callable[..., bool] = False,
    ):
        if not callable(make_layer) or isinstance(make_layer, nnx.Module):
            raise TypeError(
                f"Stack(make_layer, ...) needs a callable rngs -> nnx.Module, got "
                f"{type(make_layer).__name__}. E.g. Stack(lambda r: Block(64, rngs=r), 4, rngs=rngs)."
            )
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"Stack num_layers must be a positive integer, got {num_layers!r}.")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"Stack(..., rngs=...) needs an nnx.Rngs, got {type(rngs).__name__}.")
        policy = resolve_remat(remat)

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            layer = make_layer(rngs)
            if not isinstance(layer, nnx.Module):
                raise TypeError(
                    f"Stack's make_layer must return an nnx.Module, got {type(layer).__name__}."
                )
            return layer

        self.layers = create(rngs)
        self.num_layers = num_layers
        self.remat = policy
        for _, node in nnx.iter_graph(self.layers):
            if isinstance(node, nnx.Variable):
                node.set_metadata(STACK_METADATA, num_layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        executor = current_executor()
        if executor is not None:
            return executor(self, x)
        return self.scan(x)

    def scan(self, x: jax.Array) -> jax.Array:
        """Apply the layers sequentially on the current devices (one compiled loop body)."""
        graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
        y, new_rest = scan_layers(graphdef, params, rest, x, self.remat)
        nnx.update(self.layers, new_rest)
        return y
