"""Hybrid parallelism: an N-D mesh over `data`, `fsdp` and `tensor` axes.

- `tensor`: placement from the model's `nnx.with_partitioning` annotations (logical names mapped
  to mesh axes by `logical_rules`) or from regex rules over '/'-joined parameter paths;
- `fsdp`: then shards the largest remaining dimension divisible by its size (and the optimizer
  state with it);
- `data` × `fsdp`: split the batch. XLA inserts every collective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jax.sharding import Mesh, NamedSharding

from meshfit.strategies import rules as R
from meshfit.strategies.base import Layout, Strategy, make_mesh

DEFAULT_MIN_SHARD_BYTES = 4096


def _size_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)


class Hybrid(Strategy):
    """Data × FSDP × tensor parallelism on one mesh.

    Args:
        data, fsdp, tensor: axis sizes (one of them may be -1: "the remaining devices"). Axes
            left out are absent. With no sizes at all, a preset from the device count:
            data=2 × fsdp=n/2 (n even, n ≥ 4), else fsdp=n.
        mesh_shape, axis_names: the same mesh written as in other JAX libraries, e.g.
            `Hybrid(mesh_shape=(2, 4), axis_names=("data", "tensor"))`.
        rules: `{regex: spec}` over '/'-joined parameter paths, e.g.
            `{r".*l1/kernel": (None, "tensor")}`; the first full match wins and overrides the
            annotation.
        logical_rules: logical axis name -> mesh axis (or None), merged over
            `rules.DEFAULT_LOGICAL_RULES`; used for `nnx.with_partitioning` annotations.
        min_shard_bytes: parameters smaller than this are not sharded over `fsdp`.
    """

    name = "hybrid"
    use_annotations = True

    def __init__(
        self,
        data: int | None = None,
        fsdp: int | None = None,
        tensor: int | None = None,
        *,
        mesh_shape: Sequence[int] | None = None,
        axis_names: Sequence[str] | None = None,
        rules: Mapping[str, Any] | None = None,
        logical_rules: Mapping[str, str | None] | None = None,
        min_shard_bytes: int = DEFAULT_MIN_SHARD_BYTES,
    ):
        by_name = {"data": data, "fsdp": fsdp, "tensor": tensor}
        given = {k: v for k, v in by_name.items() if v is not None}
        if mesh_shape is not None or axis_names is not None:
            if given:
                raise ValueError(
                    f"{type(self).__name__}: pass either axis sizes ({', '.join(given)}=...) or "
                    "mesh_shape/axis_names, not both."
                )
            if mesh_shape is None or axis_names is None:
                raise ValueError(
                    f"{type(self).__name__}: mesh_shape and axis_names go together, e.g. "
                    "mesh_shape=(2, 4), axis_names=('data', 'tensor')."
                )
            mesh_shape, axis_names = tuple(mesh_shape), tuple(axis_names)
            if len(mesh_shape) != len(axis_names):
                raise ValueError(
                    f"mesh_shape {mesh_shape} has {len(mesh_shape)} entries but axis_names "
                    f"{axis_names} has {len(axis_names)}; give one name per dimension."
                )
            for name in axis_names:
                if name not in R.KNOWN_AXES:
                    raise ValueError(
                        f"Unknown mesh axis name {name!r} in axis_names={axis_names}. "
                        f"Use names from {R.KNOWN_AXES}."
                    )
            if len(set(axis_names)) != len(axis_names):
                raise ValueError(f"axis_names={axis_names} repeats a name; each axis once.")
            given = dict(zip(axis_names, mesh_shape))
        for name, value in given.items():
            if not _size_ok(value):
                raise ValueError(
                    f"{type(self).__name__}({name}={value!r}): an axis size must be a positive "
                    "integer, or -1 for the remaining devices."
                )
        if sum(v == -1 for v in given.values()) > 1:
            raise ValueError(
                f"{type(self).__name__}: at most one axis size may be -1, got {given}."
            )
        if not isinstance(min_shard_bytes, int) or min_shard_bytes < 0:
            raise ValueError(
                f"min_shard_bytes must be a non-negative int, got {min_shard_bytes!r}."
            )
        self.axes: dict[str, int] = given  # requested sizes, in mesh order
        self.rules = R.compile_rules(rules)
        self.user_logical = dict(logical_rules or {})
        for name, target in self.user_logical.items():
            if target is not None and target not in R.KNOWN_AXES:
                raise ValueError(
                    f"logical_rules maps {name!r} to unknown mesh axis {target!r}. Use one of "
                    f"{R.KNOWN_AXES} or None."
                )
        self.logical_rules = {**R.DEFAULT_LOGICAL_RULES, **self.user_logical}
        self.min_shard_bytes = min_shard_bytes

    # ------------------------------------------------------------------ mesh
    def preset(self, n: int) -> dict[str, int]:
        """Axis sizes when none were given: data=2 × fsdp=n/2 on an even count ≥ 4."""
        if n >= 4 and n % 2 == 0:
            return {"data": 2, "fsdp": n // 2}
        return {"fsdp": n}

    def resolve_axes(self, n: int) -> dict[str, int]:
        """The concrete axis sizes for `n` available devices, or a clear error."""
        axes = dict(self.axes) or self.preset(n)  # keyword sizes: data, fsdp, tensor order
        known = math.prod(v for v in axes.values() if v != -1)
        for name, value in axes.items():
            if value == -1:
                if n % known:
                    raise ValueError(
                        f"{self!r}: the other axes use {known} devices, which does not divide the "
                        f"{n} available, so {name}=-1 has no whole size. Use sizes dividing {n}."
                    )
                axes[name] = n // known
        total = math.prod(axes.values())
        shape = " × ".join(f"{k}={v}" for k, v in axes.items())
        if total > n:
            raise ValueError(
                f"{self!r} needs {total} devices ({shape}), but only {n} are available. Use "
                f"smaller axes whose product is {n}, or run on more devices."
            )
        if total != n:
            raise ValueError(
                f"{self!r}: the mesh {shape} uses {total} devices, but {n} are available. Make "
                f"the product {n} (e.g. one axis = -1), or pass Engine(devices={total})."
            )
        return axes

    def build_mesh(self, devices: list[Any]) -> Mesh:
        axes = self.resolve_axes(len(devices))
        mesh = make_mesh(tuple(axes.values()), tuple(axes), devices)
        for pattern, spec in self.rules:
            for axis in R.spec_axes(spec):
                if axis not in mesh.shape:
                    raise ValueError(
                        f"Sharding rule {pattern.pattern!r}: {spec} names mesh axis {axis!r}, "
                        f"but this mesh has only {tuple(mesh.shape)}. Add that axis (e.g. "
                        f"Hybrid({axis}=2, ...)) or change the rule."
                    )
        for name in self.user_logical:
            target = self.logical_rules[name]
            if target is not None and target not in mesh.shape:
                raise ValueError(
                    f"logical_rules maps {name!r} to mesh axis {target!r}, but this mesh has only "
                    f"{tuple(mesh.shape)}. Map it to one of those axes or None."
                )
        return mesh

    # ------------------------------------------------------------------ derived sizes
    def _axis(self, name: str) -> int:
        return self._require_mesh().shape.get(name, 1)

    @property
    def data_axes(self) -> tuple[str, ...]:
        mesh = self._require_mesh()
        return tuple(a for a in ("data", "fsdp") if a in mesh.shape)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Leading dim over data × fsdp; replicated on a mesh with neither (pure tensor)."""
        return super().batch_sharding(ndim) if self.data_axes else self.replicated()

    @property
    def data_parallel_size(self) -> int:
        """Ways the batch is split: data × fsdp."""
        return self._axis("data") * self._axis("fsdp")

    @property
    def num_replicas(self) -> int:
        """Full copies of the model: the `data` size (fsdp and tensor split one copy)."""
        return self._axis("data")

    @property
    def model_shards(self) -> int:
        """Devices one model copy is split over: fsdp × tensor."""
        return self._axis("fsdp") * self._axis("tensor")

    # ------------------------------------------------------------------ layout
    def param_spec(self, info: R.ParamInfo) -> tuple:
        """Tensor placement (rule, else annotation), validated; then fsdp on the largest dim."""
        mesh = self._require_mesh()
        spec = R.regex_spec(info.path, self.rules)
        source = "A sharding rule"
        if spec is None and self.use_annotations and info.annotation is not None:
            spec = R.logical_to_mesh(info, self.logical_rules, mesh, set(self.user_logical))
            source = "The nnx.with_partitioning annotation"
        spec = tuple(spec or ())
        R.check_spec(info, spec, mesh, source)
        return R.add_largest_dim(info, spec, "fsdp", mesh, self.min_shard_bytes)

    def state_shardings(self, abstract_state: Any) -> Any:
        return R.layout_state(abstract_state, self._require_mesh(), self.param_spec)[0]

    def describe(self, layout: Layout | None = None) -> str:
        mesh = self._require_mesh()
        axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
        text = (
            f"{type(self).__name__} on {mesh.devices.size} device(s), mesh {axes}: batch over "
            f"{' x '.join(self.data_axes)} ({self.data_parallel_size}-way), {self.num_replicas} "
            "model replica(s)"
        )
        return text if layout is None else f"{text}; {layout.describe()}"

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.axes.items())
        return f"{type(self).__name__}({sizes})"
