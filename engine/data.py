"""Feeding data: host batches -> global arrays on the mesh, placed ahead of use.

Every process loads only its own rows of each global batch; the global array is assembled
from the per-process pieces (`jax.make_array_from_process_local_data`), so the same code
serves one process and many.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding


def _is_array_data(data: Any) -> bool:
    if isinstance(data, dict):
        return bool(data) and all(isinstance(v, np.ndarray) for v in data.values())
    if isinstance(data, tuple | list):
        return bool(data) and all(isinstance(v, np.ndarray) for v in data)
    return isinstance(data, np.ndarray)


class HostBatch(NamedTuple):
    """One global batch as this process sees it: its rows, plus the global row count."""

    local: Any
    global_size: int
    sharded: bool = True


class ArrayLoader:
    """Batches a tuple/dict (or a single array) of equal-length NumPy arrays.

    The training order within an epoch is a permutation that depends only on (seed, epoch):
    not on the batch size, the strategy or the number of processes.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        name: str,
    ):
        leaves = jax.tree.leaves(data)
        lengths = {len(x) if np.ndim(x) else 0 for x in leaves}
        if len(lengths) != 1 or 0 in lengths:
            shapes = jax.tree.map(lambda x: tuple(np.shape(x)), data)
            raise ValueError(
                f"{name}: all arrays must have the same number of rows (first dimension), got "
                f"shapes {shapes}. Pass arrays of equal length, e.g. (x[:n], y[:n])."
            )
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_rows = lengths.pop()
        if self.num_rows < batch_size and drop_last:
            raise ValueError(
                f"{name} has {self.num_rows} rows, fewer than one batch of {batch_size}, so an "
                f"epoch would have no step. Use batch_size <= {self.num_rows} or more data."
            )

    def __len__(self) -> int:
        full, rem = divmod(self.num_rows, self.batch_size)
        return full + (1 if rem and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def epoch(
        self, epoch: int, start: int = 0, rows_for: RowsFn | None = None
    ) -> Iterator[HostBatch]:
        """Host batches of `epoch` from batch index `start`; `rows_for(n)` picks local rows."""
        order = self.order(epoch)
        leaves, treedef = jax.tree.flatten(self.data)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            lo, hi, sharded = rows_for(len(idx)) if rows_for else (0, len(idx), True)
            rows = idx[lo:hi]
            local = jax.tree.unflatten(treedef, [x[rows] for x in leaves])
            yield HostBatch(local, len(idx), sharded)


class IterableLoader:
    """Wraps an iterable of batches already split per process (each yields its own rows)."""

    def __init__(self, data: Iterable[Any], process_count: int, name: str):
        if not isinstance(data, Iterable):
            raise TypeError(
                f"{name} must be a tuple/dict of NumPy arrays or an iterable of batches, got "
                f"{type(data).__name__}."
            )
        self.data, self.process_count, self.name = data, process_count, name
        self._shapes: Any = None

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def epoch(
        self, epoch: int, start: int = 0, rows_for: RowsFn | None = None
    ) -> Iterator[HostBatch]:
        for i, batch in enumerate(self.data):
            if i < start:
                continue
            batch = jax.tree.map(np.asarray, batch)
            leaves = jax.tree.leaves(batch)
            yield HostBatch(batch, len(leaves[0]) * self.process_count if leaves else 0)


RowsFn = Callable[[int], tuple[int, int, bool]]


class MicroBatches(NamedTuple):
    """One optimizer step's window of `k` micro-batches (gradient accumulation).

    `data` interleaves the micro-batches: row r of micro-batch j sits at position r*k + j, so
    the step's strided split (reshape to (rows/k, k, ...), swap the first two axes) gives back
    micro-batch j with each row on the device it was placed on. `count` (int32 scalar) is how
    many micro-batches are real; a short final window is padded with copies of its first one.
    """

    data: Any
    count: Any


class MicroBatchWindows:
    """Groups `k` consecutive batches of `loader` into one step (Lightning's accumulation).

    The epoch's micro-batches are exactly those of `loader` (same order, same rows); the last
    window holds the remaining 1..k micro-batches, padded, with their real count.
    """

    def __init__(self, loader: Any, k: int, name: str = "train_data"):
        self.loader, self.k, self.name = loader, k, name

    def __len__(self) -> int:
        return -(-len(self.loader) // self.k)

    def epoch(
        self, epoch: int, start: int = 0, rows_for: RowsFn | None = None
    ) -> Iterator[HostBatch]:
        group: list[HostBatch] = []
        for batch in self.loader.epoch(epoch, start * self.k, rows_for):
            if group and (batch.global_size, batch.sharded) != (
                group[0].global_size,
                group[0].sharded,
            ):
                raise ValueError(
                    f"{self.name}: with gradient accumulation every batch must have the same "
                    f"number of rows, got {batch.global_size} after {group[0].global_size}. "
                    "Drop the last partial batch of the iterable (drop_last=True)."
                )
            group.append(batch)
            if len(group) == self.k:
                yield self._window(group)
                group = []
        if group:
            yield self._window(group)

    def _window(self, group: list[HostBatch]) -> HostBatch:
        count = len(group)
        group = group + [group[0]] * (self.k - count)

        def interleave(*xs: np.ndarray) -> np.ndarray:
            return np.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])

        data = jax.tree.map(interleave, *[b.local for b in group])
        window = MicroBatches(data, np.asarray(count, np.int32))
        return HostBatch(window, group[0].global_size * self.k, group[0].sharded)


def make_loader(
    data: Any,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    process_count: int,
    name: str,
    micro_batches: int = 1,
):
    """An ArrayLoader for NumPy data, an IterableLoader for anything iterable; with
    `micro_batches` > 1, windows of that many batches per step (`MicroBatchWindows`)."""
    if micro_batches > 1:
        inner = make_loader(
            data, batch_size, train=train, seed=seed, process_count=process_count, name=name
        )
        return MicroBatchWindows(inner, micro_batches, name)
    if isinstance(data, tuple | list | dict) and not _is_array_data(data):
        leaves = jax.tree.leaves(data)
        if leaves and all(hasattr(x, "shape") for x in leaves):
            data = jax.tree.map(np.asarray, data)
    if _is_array_data(data):
        if isinstance(data, list):
            data = tuple(data)
        return ArrayLoader(data, batch_size, shuffle=train, drop_last=train, seed=seed, name=name)
    if isinstance(data, PerProcess):
        return IterableLoader(data.batches, process_count, name)
    if process_count > 1:
        raise TypeError(
            f"{name} is an iterable of batches in a run of {process_count} processes. Each "
            "process must yield only its own rows of every global batch; wrap it as "
            "meshfit.PerProcess(batches) to say so (NumPy arrays are split automatically)."
        )
    return IterableLoader(data, process_count, name)


@dataclass(frozen=True)
class PerProcess:
    """Marks an iterable whose batches hold only this process's rows of each global batch
    (the global batch is assembled from every process's part)."""

    batches: Iterable[Any]


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
