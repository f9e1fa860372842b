"""The `Strategy` interface: where the state and the batches live, and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshfit.engine.trees import is_variable, path_str


def make_mesh(shape: Sequence[int], names: Sequence[str], devices: Sequence[Any]) -> Mesh:
    """A mesh with Auto axes, so GSPMD propagates shardings through unannotated user models."""
    return jax.make_mesh(
        tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(shape), devices=list(devices)
    )


def nearest_multiples(n: int, k: int) -> str:
    """The multiples of `k` around `n`, for error messages: '96 or 104' (or '8' below k)."""
    lo, hi = (n // k) * k, (n // k + 1) * k
    return f"{lo} or {hi}" if lo else f"{hi}"


class Layout(NamedTuple):
    """A strategy's answer for one train state: the shardings of every leaf, the partition spec
    of every parameter (by '/'-joined path), and, for a pipeline, the layers of each Stack."""

    shardings: Any
    param_specs: dict[str, P]
    stacks: dict[str, int] = {}  # noqa: RUF012 (an immutable default: never mutated)

    def describe(self) -> str:
        """One line for the model summary: how many parameters are sharded."""
        sharded = sum(1 for spec in self.param_specs.values() if any(spec))
        return f"{sharded}/{len(self.param_specs)} parameters sharded"


def param_specs(shardings: Any) -> dict[str, P]:
    """The partition spec of every parameter in a train state's shardings (or of every leaf of
    a plain state's), by path."""
    params = getattr(shardings, "params", shardings)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]
    return {
        path_str(keypath): (leaf.get_value() if is_variable(leaf) else leaf).spec
        for keypath, leaf in flat
    }


class Strategy:
    """Placement for a training run. Subclasses answer three questions:

    - `build_mesh(devices)`: which mesh (named axes over the devices);
    - `state_shardings(abstract_state)`: how the train state is laid out on it;
    - `data_axes`: which mesh axes the batch dimension is split over.

    `step_context()` lets a strategy change how layers execute while the step is traced
    (the pipeline strategy runs a `Stack` across stages this way).
    """

    name = "strategy"
    mesh: Mesh | None = None

    def setup(self, devices: Sequence[Any]) -> Mesh:
        """Build and remember the mesh over `devices`."""
        self.mesh = self.build_mesh(list(devices))
        return self.mesh

    def build_mesh(self, devices: list[Any]) -> Mesh:
        raise NotImplementedError

    @property
    def data_axes(self) -> tuple[str, ...]:
        return ("data",)

    def _require_mesh(self) -> Mesh:
        if self.mesh is None:
            raise RuntimeError(
                f"Strategy {self.name!r} has no mesh yet; call setup(devices) first."
            )
        return self.mesh

    @property
    def data_parallel_size(self) -> int:
        """How many ways the global batch is split (the batch must divide by this)."""
        mesh = self._require_mesh()
        size = 1
        for axis in self.data_axes:
            size *= mesh.shape[axis]
        return size

    @property
    def num_replicas(self) -> int:
        """How many full copies of the model exist (data-parallel replicas)."""
        return self.data_parallel_size

    def per_device_batch_size(self, global_batch_size: int) -> int:
        return global_batch_size // self.data_parallel_size

    def replicated(self) -> NamedSharding:
        return NamedSharding(self._require_mesh(), P())

    def state_shardings(self, abstract_state: Any) -> Any:
        """Shardings for every leaf of the train state; replicated unless a subclass shards."""
        return jax.tree.map(lambda _: self.replicated(), abstract_state)

    def layout(self, abstract_state: Any) -> Layout:
        """The whole answer for a train state (`state_shardings` plus what it implies)."""
        shardings = self.state_shardings(abstract_state)
        return Layout(shardings, param_specs(shardings))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """The layout of one batch leaf: leading dimension split over `data_axes`."""
        if ndim == 0:
            return self.replicated()
        axes = self.data_axes
        return NamedSharding(self._require_mesh(), P(axes if len(axes) > 1 else axes[0]))

    def step_context(self) -> contextlib.AbstractContextManager:
        """Entered while the step is traced; the default changes nothing."""
        return contextlib.nullcontext()

    def check_batch_size(self, global_batch_size: int, what: str = "Global batch size") -> None:
        dp = self.data_parallel_size
        if global_batch_size % dp:
            raise ValueError(
                f"{what} {global_batch_size} is not divisible by the {dp} data-parallel devices of "
                f"strategy {self.name!r}. Use a multiple of {dp} "
                f"(e.g. {nearest_multiples(global_batch_size, dp)}), or fewer devices "
                "(Engine(devices=...))."
            )

    def describe(self, layout: Layout | None = None) -> str:
        """One line for the model summary (with a layout: how many parameters are sharded)."""
        mesh = self._require_mesh()
        axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
        text = f"{type(self).__name__} on {mesh.devices.size} device(s), mesh {axes}"
        return text if layout is None else f"{text}; {layout.describe()}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
