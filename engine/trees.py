"""Facts about pytrees of arrays: parameter paths, byte counts (logical and per device)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx


def key_name(key: Any) -> str:
    """The name of one pytree key (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: tuple) -> str:
    """'/'-joined names of a pytree key path (`params/l1/kernel`)."""
    return "/".join(key_name(k) for k in keypath)


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`a/b/c` path -> (shape, dtype) for every leaf; nnx `.value` suffixes are dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [key_name(k) for k in path]
        if names and names[-1] == "value":
            names = names[:-1]
        out["/".join(names)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def nbytes(x: Any) -> int:
    """Logical bytes of one array or abstract array."""
    return math.prod(x.shape) * x.dtype.itemsize


def tree_bytes(tree: Any) -> int:
    """Total bytes of all array leaves (logical, not per device)."""
    return sum(nbytes(x) for x in jax.tree.leaves(tree))


def shard_bytes(x: Any) -> int:
    """Bytes one device holds of `x`, from its sharding alone (the whole array if it has none)."""
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def max_device_bytes(tree: Any) -> int:
    """The largest number of bytes of `tree` any one device holds (from shardings; works for
    live and abstract arrays alike)."""
    per_device: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            continue
        size = shard_bytes(x)
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + size
    return max(per_device.values(), default=0)
