"""Placement: host batches -> global arrays on the mesh, transferred ahead of use.

Every process loads only its own rows of each global batch; the global array is assembled
from the per-process pieces (`jax.make_array_from_process_local_data`), so the same code
serves one process and many.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding


class HostBatch(NamedTuple):
    """One global batch as this process sees it: its rows, plus the global row count."""

    local: Any
    global_size: int
    sharded: bool = True


RowsFn = Callable[[int], tuple[int, int, bool]]


class Placer:
    """Turns host batches into global arrays laid out by the strategy, a few steps ahead."""

    def __init__(self, batch_sharding: Callable[[int], NamedSharding], replicated: NamedSharding):
        self.batch_sharding, self.replicated = batch_sharding, replicated
        self._rows: dict[int, tuple[int, int, bool]] = {}
        self._shardings: dict[Any, list[NamedSharding]] = {}
        self._multi = jax.process_count() > 1

    def rows_for(self, num_rows: int) -> tuple[int, int, bool]:
        """This process's contiguous rows [lo, hi) of a global batch of `num_rows`, and whether
        the batch is sharded (a batch the data axes cannot split evenly is replicated)."""
        if num_rows not in self._rows:
            sharding = self.batch_sharding(1)
            if num_rows % _num_shards(sharding):
                self._rows[num_rows] = (0, num_rows, False)
            else:
                spans = [
                    idx[0] for idx in sharding.addressable_devices_indices_map((num_rows,)).values()
                ]
                lo = min(s.start or 0 for s in spans)
                hi = max(num_rows if s.stop is None else s.stop for s in spans)
                self._rows[num_rows] = (lo, hi, True)
        return self._rows[num_rows]

    @property
    def data_shards(self) -> int:
        """How many ways the data axes split a batch (its row count must be a multiple)."""
        return _num_shards(self.batch_sharding(1))

    def place(self, batch: HostBatch) -> Any:
        leaves, treedef = jax.tree.flatten(batch.local)
        key = (treedef, tuple(map(np.ndim, leaves)), batch.sharded)
        shardings = self._shardings.get(key)
        if shardings is None:
            shardings = self._shardings[key] = [
                self.batch_sharding(ndim) if batch.sharded else self.replicated for ndim in key[1]
            ]
        if self._multi:
            arrays = [
                jax.make_array_from_process_local_data(
                    s, x, (batch.global_size, *np.shape(x)[1:]) if np.ndim(x) else ()
                )
                for s, x in zip(shardings, leaves)
            ]
        else:  # one batched transfer for the whole batch (much cheaper than one call a leaf)
            arrays = jax.device_put(leaves, shardings)
        return jax.tree.unflatten(treedef, arrays)

    def prefetch(self, batches: Iterable[HostBatch], depth: int = 2) -> Prefetcher:
        """Iterate (device batch, global rows), keeping `depth` batches already transferred."""
        return Prefetcher(self, batches, depth)


class Prefetcher:
    """Batches transferred `depth` steps ahead. The loop calls `refill` right after dispatching a
    step, so preparing and transferring the next batch overlaps the device's work; taking a
    batch is then only a pop, even right after the host waited for the device (a metric read)."""

    def __init__(self, placer: Placer, batches: Iterable[HostBatch], depth: int):
        self.placer, self.source, self.depth = placer, iter(batches), depth
        self.queue: collections.deque = collections.deque()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[Any, int]:
        if not self.queue:
            self.refill()
        if not self.queue:
            raise StopIteration
        return self.queue.popleft()

    def refill(self) -> None:
        while len(self.queue) < self.depth:
            batch = next(self.source, None)
            if batch is None:
                return
            self.queue.append((self.placer.place(batch), batch.global_size))


def _num_shards(sharding: NamedSharding) -> int:
    spec = sharding.spec[0] if len(sharding.spec) else None
    if spec is None:
        return 1
    axes = spec if isinstance(spec, tuple) else (spec,)
    return int(np.prod([sharding.mesh.shape[a] for a in axes]))
