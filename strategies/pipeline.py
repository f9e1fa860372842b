"""Pipeline parallelism: the layers of a `Stack` split over a `stage` mesh axis.

Each device holds only its stages' layers (stacked parameters sharded `P("stage")`, and the
optimizer state with them). Inside the step, the batch entering the Stack is split into
microbatches that flow through the stages in a `lax.scan` over ticks inside `jax.shard_map`,
activations moving between neighbouring devices with `ppermute`. Backward is autodiff through
the schedule (the transpose of a ppermute is the reverse ppermute). Everything outside the
Stack (embedding, head) runs as ordinary data-parallel code on the `data` axis.

Schedules, with S stages, V repeats (virtual stages per device) and M microbatches:
- "gpipe": device d runs layers [d·L/S, (d+1)·L/S); M + S − 1 ticks.
- "circular": virtual stage j = r·S + d (r < V) runs on device d, activations go round the
  ring V times; max(M, S)·V + S − 1 ticks, so the bubble shrinks by ~V. Parameters are stored
  contiguously by layer (what every other strategy sees), so each step regroups the stacked
  parameters into the interleaved layout with one all-to-all (and the gradients back).

Non-parameter state of the layers (RNG counts) is carried per microbatch; state that depends
on the data (BatchNorm statistics) is not supported inside a pipelined Stack.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshfit.engine.remat import Remat
from meshfit.engine.stack import Stack, scan_layers, stack_executor, stack_size
from meshfit.strategies.base import Layout, Strategy, make_mesh, nearest_multiples, param_specs

SCHEDULES = ("gpipe", "circular")


def _positive(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"Pipeline({name}=...) must be a positive integer, got {value!r}.")


def schedule_ticks(stages: int, microbatches: int, repeats: int) -> int:
    """Ticks of the schedule (each device runs one virtual stage per tick)."""
    slots = max(microbatches, stages) if repeats > 1 else microbatches
    return slots * repeats + stages - 1


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Fraction of device-ticks that are idle: GPipe (S−1)/(M+S−1); circular (S−1)/(M·V+S−1)
    when M ≥ S (with fewer microbatches the ring has idle slots too)."""
    ticks = schedule_ticks(stages, microbatches, repeats)
    return 1.0 - microbatches * repeats / ticks


class Pipeline(Strategy):
    """Run each `Stack` of the model as a pipeline over a `stage` mesh axis.

    Args:
        stages: S, the devices a Stack's layers are split over (default: all devices / data).
        microbatches: M, how many pieces the batch entering a Stack is split into (default 2·S).
        schedule: "gpipe" or "circular" (interleaved: V virtual stages per device).
        repeats: V, virtual stages per device for "circular" (layers must divide by S·V).
        data: D, an optional data-parallel axis; the mesh is data × stage (default 1, or
            devices / stages when `stages` is given).
    """

    name = "pipeline"

    def __init__(
        self,
        stages: int | None = None,
        microbatches: int | None = None,
        schedule: str = "gpipe",
        repeats: int = 1,
        data: int | None = None,
    ):
        for name, value in (
            ("stages", stages),
            ("microbatches", microbatches),
            ("repeats", repeats),
            ("data", data),
        ):
            _positive(name, value)
        if schedule not in SCHEDULES:
            raise ValueError(
                f"Pipeline(schedule={schedule!r}) is not a known schedule; use one of {SCHEDULES}."
            )
        if schedule == "gpipe" and repeats != 1:
            raise ValueError(
                f"Pipeline(repeats={repeats}) needs schedule='circular' (GPipe runs each device's "
                "layers once per microbatch). Pass schedule='circular' or repeats=1."
            )
        self.stages, self.microbatches, self.data = stages, microbatches, data
        self._requested = (stages, microbatches, data)  # resolved against the devices in setup
        self.schedule, self.repeats = schedule, repeats

    # ------------------------------------------------------------------ placement
    def build_mesh(self, devices: list[Any]) -> Mesh:
        n = len(devices)
        stages, microbatches, data = self._requested
        if stages is None:
            data = data or 1
            if n % data:
                raise ValueError(
                    f"Pipeline(data={data}) does not divide the {n} devices; pass stages=... too "
                    f"or use a data size dividing {n}."
                )
            stages = n // data
        elif data is None:
            data = max(n // stages, 1)
        if stages * data > n:
            raise ValueError(
                f"Pipeline(stages={stages}, data={data}) needs {stages * data} devices "
                f"(stages × data), but only {n} are available. Use fewer stages (at most "
                f"{n // data}) or a smaller data axis, or run on more devices."
            )
        self.stages, self.data = stages, data
        self.microbatches = microbatches or 2 * stages
        return make_mesh((data, stages), ("data", "stage"), devices[: data * stages])

    @property
    def data_axes(self) -> tuple[str, ...]:
        return ("data",)

    def stage_sharding(self, ndim: int) -> NamedSharding:
        """The layout of a stacked variable: its leading (layer) axis split over `stage`."""
        return NamedSharding(self._require_mesh(), P("stage", *([None] * (ndim - 1))))

    def state_shardings(self, abstract_state: Any) -> Any:
        """Stacked variables (and optimizer state mirroring them) on `stage`; the rest replicated."""
        return self.layout(abstract_state).shardings

    def layout(self, abstract_state: Any) -> Layout:
        """`state_shardings`, with the layers of each Stack (stacked variable path -> layers)."""
        self._require_mesh()
        stacks: dict[str, int] = {}

        def place(path, leaf):
            layers = stack_size(leaf)
            if layers is None:
                return jax.tree.map(lambda _: self.replicated(), leaf)
            stacks[jax.tree_util.keystr(path)] = layers

            def shard(x):
                if x.ndim >= 1 and x.shape[0] == layers:
                    return self.stage_sharding(x.ndim)
                return self.replicated()

            return jax.tree.map(shard, leaf)

        is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        shardings = jax.tree_util.tree_map_with_path(place, abstract_state, is_leaf=is_variable)
        if not stacks:
            raise ValueError(
                "strategy 'pipeline' found no meshfit.Stack in the model, so there is nothing to "
                "split into stages. Put the repeated layers in a Stack, e.g. "
                "`self.blocks = Stack(lambda r: Block(dim, rngs=r), num_layers, rngs=rngs)` and "
                "call `self.blocks(x)`, or use a strategy without stages (dp, fsdp)."
            )
        per = self.stages * self.repeats
        for path, layers in stacks.items():
            if layers % per:
                hint = "" if self.repeats == 1 else f" × repeats {self.repeats}"
                raise ValueError(
                    f"The Stack holding {path} has {layers} layers, not divisible by stages "
                    f"{self.stages}{hint} = {per}. Use a multiple of {per} layers, or stages/"
                    f"repeats whose product divides {layers}."
                )
        return Layout(shardings, param_specs(shardings), stacks)

    def check_batch_size(self, global_batch_size: int, what: str = "Global batch size") -> None:
        need = self.microbatches * self.data_parallel_size
        if global_batch_size % need:
            raise ValueError(
                f"{what} {global_batch_size} is not divisible by microbatches "
                f"{self.microbatches} × data {self.data_parallel_size} = {need} of strategy "
                f"'pipeline'. Use a multiple of {need} "
                f"(e.g. {nearest_multiples(global_batch_size, need)}), or change "
                "Pipeline(microbatches=...)."
            )

    # ------------------------------------------------------------------ execution
    def step_context(self):
        return stack_executor(self.run_stack)

    def run_stack(self, stack: Stack, x: jax.Array) -> jax.Array:
        """Execute `stack` on `x` with this strategy's schedule (called while tracing a step).

        A batch the data axis cannot split (the engine replicates a partial last validation
        batch) runs replicated over `data`; a batch not divisible by M runs with the largest
        microbatch count that divides it.
        """
        mesh = self._require_mesh()
        graphdef, params, rest = nnx.split(stack.layers, nnx.Param, ...)
        rows = x.shape[0]
        batch_axis = "data" if rows % self.data == 0 else None
        local_rows = rows // self.data if batch_axis else rows
        microbatches = max(m for m in range(1, self.microbatches + 1) if local_rows % m == 0)
        y, new_rest = pipeline_apply(
            graphdef,
            params,
            rest,
            x,
            mesh=mesh,
            repeats=self.repeats,
            microbatches=microbatches,
            batch_axis=batch_axis,
            remat=stack.remat,
        )
        nnx.update(stack.layers, new_rest)
        return y

    # ------------------------------------------------------------------ reporting
    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.microbatches, self.repeats)

    def describe(self, layout: Layout | None = None) -> str:
        """Stages, microbatches, schedule and bubble; with the layout, layers per stage."""
        mesh = self._require_mesh()
        virtual = f" x {self.repeats} repeats" if self.schedule == "circular" else ""
        text = (
            f"Pipeline on {mesh.devices.size} device(s), mesh data={self.data} x "
            f"stage={self.stages}: {self.stages} stages{virtual}, {self.microbatches} "
            f"microbatches, schedule {self.schedule}, bubble {self.bubble:.1%}"
        )
        if layout is not None and layout.stacks:
            layers = sorted(set(layout.stacks.values()))
            per_stage = ", ".join(str(n // self.stages) for n in layers)
            text += f"; layers per stage {per_stage} (of {', '.join(map(str, layers))})"
        return text

    def __repr__(self) -> str:
        return (
            f"Pipeline(stages={self.stages}, microbatches={self.microbatches}, "
            f"schedule={self.schedule!r}, repeats={self.repeats}, data={self.data})"
        )


# ---------------------------------------------------------------------- the schedule
def _vary(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark `x` device-varying over `axes` (scan carries must keep one type across ticks)."""
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _where(cond: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def _index(tree: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _set(tree: Any, i: jax.Array, value: Any) -> Any:
    return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, value)


def pipeline_apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    x: jax.Array,
    *,
    mesh: Mesh,
    repeats: int,
    microbatches: int,
    batch_axis: str | None,
    idle_value: float = 0.0,
    mask_idle: bool = True,
    remat: Remat | None = None,
) -> tuple[jax.Array, nnx.State]:
    """Run stacked layers (leading axis L) on `x` as a pipeline over `mesh`'s `stage` axis.

    Layer `(r·S + d)·K + k` (K = L / (S·V)) runs on device d in repeat r, so V = 1 is GPipe.
    The batch is split strided into `microbatches` (row i -> microbatch i mod M), keeping each
    row on its `batch_axis` device. `idle_value` fills the buffers idle ticks read from; their
    input is masked to zero (`mask_idle`) so garbage never reaches a layer or its gradient.
    `remat` rematerialises each layer as in `Stack.scan`.
    Returns the output (same shape as `x`) and the layers' updated non-parameter state.
    """
    stages, num = mesh.shape["stage"], microbatches
    layers = jax.tree.leaves(params)[0].shape[0]
    per_stage = layers // (stages * repeats)
    rows = x.shape[0]
    if rows % num:
        raise ValueError(f"Batch of {rows} rows does not split into {num} microbatches.")
    # (L, ...) -> (V, S, K, ...): the stage axis holds each device's virtual stages.
    grid = lambda a: a.reshape(repeats, stages, per_stage, *a.shape[1:])  # noqa: E731
    params, rest = jax.tree.map(grid, (params, rest))
    w_spec = P(None, "stage")
    params, rest = jax.lax.with_sharding_constraint(
        (params, rest), jax.tree.map(lambda _: NamedSharding(mesh, w_spec), (params, rest))
    )
    xs = jnp.swapaxes(x.reshape(rows // num, num, *x.shape[1:]), 0, 1)  # (M, rows/M, ...)
    x_spec = P(None, batch_axis)
    body = functools.partial(
        _schedule,
        graphdef,
        stages=stages,
        repeats=repeats,
        microbatches=num,
        axes=("stage",) + ((batch_axis,) if batch_axis else ()),
        idle_value=idle_value,
        mask_idle=mask_idle,
        remat=remat,
    )
    ys, rest = jax.shard_map(
        body, mesh=mesh, in_specs=(w_spec, w_spec, x_spec), out_specs=(x_spec, w_spec)
    )(params, rest, xs)
    y = jnp.swapaxes(ys, 0, 1).reshape(x.shape)
    rest = jax.tree.map(lambda a: a.reshape(layers, *a.shape[3:]), rest)
    return y, rest


def _schedule(
    graphdef,
    params,
    rest,
    xs,
    *,
    stages,
    repeats,
    microbatches,
    axes,
    idle_value,
    mask_idle,
    remat,
):
    """One device's side of the schedule: a scan over ticks (runs inside shard_map)."""
    params, rest = jax.tree.map(lambda a: a[:, 0], (params, rest))  # (V, K, ...)
    rest = jax.tree.map(lambda a: _vary(a, ("stage",)), rest)
    d = jax.lax.axis_index("stage")
    slots = max(microbatches, stages) if repeats > 1 else microbatches
    items = slots * repeats
    ring = [(j, (j + 1) % stages) for j in range(stages)]
    chain = ring if repeats > 1 else ring[:-1]
    fill = lambda shape: _vary(jnp.full(shape, idle_value, xs.dtype), axes)  # noqa: E731
    state = fill(xs.shape[1:])
    out = fill(xs.shape)
    buf = fill((slots, *xs.shape[1:])) if repeats > 1 else None

    def tick(carry, t):
        state, out, buf, rest = carry
        i = t - d
        ic = jnp.clip(i, 0, items - 1)
        rep, m = ic // slots, ic % slots
        active = (i >= 0) & (i < items) & (m < microbatches)
        mc = jnp.minimum(m, microbatches - 1)
        first = _index(xs, mc)
        if repeats > 1:
            first = jnp.where(rep == 0, first, _index(buf, m))
        inp = jnp.where(d == 0, first, state)
        if mask_idle:
            inp = jnp.where(active, inp, jnp.zeros_like(inp))
        layer_rest = _index(rest, rep)
        y, new_rest = scan_layers(graphdef, _index(params, rep), layer_rest, inp, remat)
        rest = _set(rest, rep, _where(active, new_rest, layer_rest))
        done = active & (d == stages - 1) & (rep == repeats - 1)
        out = _set(out, mc, jnp.where(done, y, _index(out, mc)))
        nxt = jax.lax.ppermute(y, "stage", chain) if stages > 1 else y
        if repeats > 1:  # device 0 keeps what comes round the ring for the next repeat
            j = t - (stages - 1)
            jc = jnp.clip(j, 0, items - 1)
            keep = (d == 0) & (j >= 0) & (j < items) & (jc // slots < repeats - 1)
            buf = _set(buf, jc % slots, jnp.where(keep, nxt, _index(buf, jc % slots)))
        return (nxt, out, buf, rest), None

    ticks = jnp.arange(schedule_ticks(stages, microbatches, repeats))
    (_, out, _, rest), _ = jax.lax.scan(tick, (state, out, buf, rest), ticks)
    ys = jax.lax.psum(jnp.where(d == stages - 1, out, jnp.zeros_like(out)), "stage")
    return ys, jax.tree.map(lambda a: a[:, None], rest)
