"""Training data kept on the device: transferred once, each step's rows gathered on the device
through the epoch's permutation (the same `(seed, epoch)` order as `ArrayLoader.order`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from meshfit.engine.data import ArrayLoader
from meshfit.engine.trees import tree_bytes
from meshfit.strategies.base import Strategy

#: Where the device reports its memory: at most this fraction of it holds the training data.
MEMORY_FRACTION = 0.25
#: Where it does not (CPU): the fixed budget.
FIXED_BUDGET = 1 << 30  # 1 GiB


def budget(devices: Any) -> int:
    """Bytes of training data "auto" keeps on the device: MEMORY_FRACTION of the smallest
    reported `bytes_limit`, else FIXED_BUDGET (CPU devices report no memory)."""
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return int(MEMORY_FRACTION * min(limits)) if limits else FIXED_BUDGET


def why_not_on_device(loader: Any, process_count: int) -> str | None:
    """Why this training data cannot live on the device (None: it can)."""
    if not isinstance(loader, ArrayLoader):
        return (
            "it is not NumPy arrays (an iterable of batches), or gradient accumulation groups "
            "the batches"
        )
    if process_count > 1:
        return f"the run has {process_count} processes (data on the device is single-process)"
    return None


def choose(setting: bool | str, loader: Any, process_count: int, devices: Any) -> bool:
    """Whether this fit keeps its training data on the device; `True` that cannot be honoured
    is an error (before anything compiles)."""
    if setting is False:
        return False
    reason = why_not_on_device(loader, process_count)
    if setting is True:
        if reason:
            raise ValueError(
                f"Engine(data_on_device=True) cannot keep train_data on the device: {reason}. "
                "Pass NumPy arrays in a single-process run without accumulation, or use "
                "data_on_device='auto' (falls back to the host path)."
            )
        return True
    return reason is None and tree_bytes(loader.data) <= budget(devices)


class DeviceData:
    """The training arrays on the device (rows sharded like a batch when they split evenly,
    else replicated) and the epoch permutations, placed once per epoch."""

    def __init__(self, loader: ArrayLoader, strategy: Strategy):
        self.loader, self.rows = loader, loader.batch_size
        n = loader.num_rows

        def place(x: np.ndarray) -> Any:
            sharding = strategy.batch_sharding(x.ndim)
            shards = int(np.prod([sharding.mesh.shape[a] for a in _axes(sharding)]))
            return sharding if n % shards == 0 else strategy.replicated()

        leaves, treedef = jax.tree.flatten(loader.data)
        arrays = jax.device_put(leaves, [place(x) for x in leaves])
        self.data = jax.tree.unflatten(treedef, arrays)
        self.replicated = strategy.replicated()
        self._perm: tuple[int, Any] | None = None
        self._step_shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((self.rows, *x.shape[1:]), x.dtype), self.data
        )

    def __len__(self) -> int:
        return len(self.loader)

    def permutation(self, epoch: int) -> jax.Array:
        """The epoch's row order on the device (int32), transferred once per epoch."""
        if self._perm is None or self._perm[0] != epoch:
            order = self.loader.order(epoch).astype(np.int32)
            self._perm = (epoch, jax.device_put(order, self.replicated))
        return self._perm[1]

    def xs(self, epoch: int, start: int) -> tuple[Any, jax.Array, np.ndarray]:
        """The fused step's batch source for steps from batch `start` of `epoch`."""
        return self.data, self.permutation(epoch), np.int32(start)

    def step_shapes(self) -> Any:
        """One step's batch as shapes (what fused batch hooks receive)."""
        return self._step_shapes


def _axes(sharding: Any) -> tuple:
    spec = sharding.spec[0] if len(sharding.spec) else None
    if spec is None:
        return ()
    return spec if isinstance(spec, tuple) else (spec,)
