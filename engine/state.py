"""The train state: one pytree holding everything a run needs to continue."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """Parameters, other module variables, optimizer state, step and in-step transform states.

    - `params`: the module's `nnx.Param` variables (what the optimizer updates);
    - `rest`: every other module variable (batch statistics, RNG stream state, ...);
    - `opt_state`: the optax state (its step counter drives schedules);
    - `step`: optimizer updates applied;
    - `extra`: state of in-step transforms (loss scale, ...), keyed by transform.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    extra: dict[str, Any]


def tree_bytes(tree: Any) -> int:
    """Total bytes of all array leaves (logical, not per device)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def max_device_bytes(tree: Any) -> int:
    """The largest number of bytes of `tree` that any one device holds."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
