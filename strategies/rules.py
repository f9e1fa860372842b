"""Sharding rules shared by the sharded strategies: a spec per parameter, copied onto its
optimizer state, and validated against the mesh before anything is compiled.

A strategy supplies one function, `spec_for(ParamInfo) -> PartitionSpec`, and `layout_state`
applies it to every parameter of an abstract train state. Every other leaf whose path ends with
a parameter's path and has its shape (Adam moments, accumulators, ...) gets that parameter's
spec, so optimizer state is sharded like its parameter without knowing the optimizer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshfit.engine.trees import is_variable, path_str

#: Mesh axis names the sharded strategies understand.
KNOWN_AXES = ("data", "fsdp", "tensor")

#: Logical axis names (from `nnx.with_partitioning` annotations) -> mesh axes. A name mapped to
#: an axis the mesh lacks (e.g. "tensor" under FSDP) leaves that dimension unsharded.
DEFAULT_LOGICAL_RULES: dict[str, str | None] = {
    "data": "data",
    "batch": None,
    "fsdp": "fsdp",
    "tensor": "tensor",
    "model": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "embed": None,
    "hidden": None,
    "stage": None,
    "layers": None,
}

Axes = str | tuple[str, ...] | None


class ParamInfo(NamedTuple):
    """What a spec function knows about one parameter."""

    path: str  # '/'-joined, relative to the parameters, e.g. "l1/kernel"
    shape: tuple[int, ...]
    dtype: Any
    annotation: tuple[Axes, ...] | None  # the `nnx.with_partitioning` spec, if any

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize


# ---------------------------------------------------------------------- paths and leaves


def _value(leaf: Any) -> Any:
    return leaf.get_value() if is_variable(leaf) else leaf


def annotation_of(leaf: Any) -> tuple[Axes, ...] | None:
    """The partition annotation flax stored on a variable (`out_sharding`), or None."""
    if not is_variable(leaf):
        return None
    meta = leaf.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        spec = meta.get(key)
        if spec is not None:
            return tuple(spec)
    return None


def _axes_of(entry: Axes) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_axes(spec: P | tuple) -> list[str]:
    """Every mesh axis named in a spec."""
    return [a for entry in spec for a in _axes_of(entry)]


def pad_spec(spec: P | tuple, ndim: int) -> list[Axes]:
    entries = list(spec)
    return entries + [None] * (ndim - len(entries))


def _shard_count(entry: Axes, mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in _axes_of(entry))


# ---------------------------------------------------------------------- spec building
def check_spec(info: ParamInfo, spec: P | tuple, mesh: Mesh, source: str) -> None:
    """Raise a clear error if `spec` cannot lay out `info` on `mesh` (before any compile)."""
    where = f"parameter {info.path!r} (shape {info.shape})"
    if len(spec) > len(info.shape):
        raise ValueError(
            f"{source} gives {where} the spec {tuple(spec)} with {len(spec)} entries, but the "
            f"parameter has {len(info.shape)} dimension(s). Use at most {len(info.shape)} entries."
        )
    named = spec_axes(spec)
    for axis in named:
        if axis not in mesh.shape:
            raise ValueError(
                f"{source} shards {where} over mesh axis {axis!r}, but the mesh has only "
                f"{tuple(mesh.shape)}. Use one of those axes (or None), or add a {axis!r} axis "
                "to the strategy."
            )
    if len(set(named)) != len(named):
        raise ValueError(f"{source} uses a mesh axis twice for {where}: {tuple(spec)}.")
    for dim, entry in enumerate(spec):
        count = _shard_count(entry, mesh)
        if count > 1 and info.shape[dim] % count:
            raise ValueError(
                f"{source} shards dimension {dim} (size {info.shape[dim]}) of {where} over "
                f"{entry!r} of size {count}, which does not divide it. Choose sizes so that "
                f"{count} divides {info.shape[dim]}, or leave that dimension unsharded (None)."
            )


def logical_to_mesh(
    info: ParamInfo, logical_rules: Mapping[str, str | None], mesh: Mesh, strict: set[str]
) -> tuple[Axes, ...]:
    """Map an annotation's logical names to mesh axes. Names in `strict` (the user's own rules)
    must exist on the mesh; a default rule naming an absent axis just leaves the dim unsharded."""
    out: list[Axes] = []
    for entry in info.annotation or ():
        mapped: list[str] = []
        for name in _axes_of(entry):
            if name not in logical_rules:
                if name in mesh.shape:  # a mesh axis named directly
                    mapped.append(name)
                    continue
                raise ValueError(
                    f"Parameter {info.path!r} (shape {info.shape}) is annotated with logical axis "
                    f"{name!r}, which no rule maps to a mesh axis (rules: {dict(logical_rules)}). "
                    f"Pass logical_rules={{{name!r}: 'tensor'}} (or None to replicate)."
                )
            target = logical_rules[name]
            if target is None:
                continue
            if target not in mesh.shape:
                if name in strict:
                    raise ValueError(
                        f"logical_rules maps {name!r} to mesh axis {target!r}, but the mesh has "
                        f"only {tuple(mesh.shape)}. Map it to one of those axes or None."
                    )
                continue
            mapped.append(target)
        out.append(None if not mapped else mapped[0] if len(mapped) == 1 else tuple(mapped))
    return tuple(out)


def regex_spec(
    path: str, rules: list[tuple[re.Pattern, tuple[Axes, ...]]]
) -> tuple[Axes, ...] | None:
    """The spec of the first rule whose pattern matches the whole path, or None."""
    for pattern, spec in rules:
        if pattern.fullmatch(path):
            return spec
    return None


def compile_rules(rules: Mapping[str, Any] | None) -> list[tuple[re.Pattern, tuple[Axes, ...]]]:
    """Validate and compile `{regex: spec}` rules (axis names must be known mesh axes)."""
    compiled = []
    for pattern, spec in (rules or {}).items():
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"Sharding rule {pattern!r} is not a valid regex: {exc}.") from None
        if isinstance(spec, str) or spec is None:
            spec = (spec,)
        spec = tuple(spec)
        for axis in spec_axes(spec):
            if axis not in KNOWN_AXES:
                raise ValueError(
                    f"Sharding rule {pattern!r}: {tuple(spec)} names unknown mesh axis {axis!r}. "
                    f"Known axes: {KNOWN_AXES}."
                )
        compiled.append((regex, spec))
    return compiled


def add_largest_dim(
    info: ParamInfo, spec: tuple[Axes, ...], axis: str, mesh: Mesh, min_bytes: int
) -> tuple[Axes, ...]:
    """Also shard the largest dimension that is still free and divisible by `axis`'s size.
    Parameters smaller than `min_bytes` (or with no such dimension) are left as they are."""
    size = mesh.shape.get(axis, 1)
    if size == 1 or info.nbytes < min_bytes or axis in spec_axes(spec):
        return spec
    entries = pad_spec(spec, len(info.shape))
    free = [
        d for d, n in enumerate(info.shape) if entries[d] is None and n >= size and n % size == 0
    ]
    if not free:
        return spec
    dim = max(free, key=lambda d: (info.shape[d], -d))
    entries[dim] = axis
    return tuple(entries)


# ---------------------------------------------------------------------- whole state
def param_infos(abstract_state: Any) -> dict[str, ParamInfo]:
    """ParamInfo for each parameter of a train state (its `params` field), by path."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_state.params, is_leaf=is_variable)[0]
    infos = {}
    for keypath, leaf in flat:
        value = _value(leaf)
        path = path_str(keypath)
        infos[path] = ParamInfo(path, tuple(value.shape), value.dtype, annotation_of(leaf))
    return infos


def layout_state(
    abstract_state: Any,
    mesh: Mesh,
    spec_for: Callable[[ParamInfo], P | tuple],
) -> tuple[Any, dict[str, P]]:
    """Shardings for a whole train state from a per-parameter spec function.

    Returns the shardings (same structure as the state) and the spec of every parameter.
    Optimizer state and other leaves whose path ends with a parameter's path and whose shape
    equals the parameter's get that parameter's spec; everything else is replicated.
    """
    infos = param_infos(abstract_state)
    specs = {path: P(*spec_for(info)) for path, info in infos.items()}
    by_name = sorted(infos, key=len, reverse=True)  # longest suffix wins

    def place(keypath, leaf):
        value = _value(leaf)
        full = path_str(keypath)
        spec = P()
        shape = tuple(getattr(value, "shape", ()))
        for path in by_name:
            if (full == f"params/{path}" or full.endswith("/" + path)) and shape == infos[
                path
            ].shape:
                spec = specs[path]
                break
        sharding = NamedSharding(mesh, spec)
        return jax.tree.map(lambda _: sharding, leaf) if is_variable(leaf) else sharding

    shardings = jax.tree_util.tree_map_with_path(place, abstract_state, is_leaf=is_variable)
    return shardings, specs
