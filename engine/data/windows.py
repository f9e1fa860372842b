"""Gradient accumulation: `k` consecutive batches of a loader fed to one optimizer step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from meshfit.engine.data.placement import HostBatch, RowsFn


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
    window holds the remaining 1..k micro-batches, padded, with their real count. Positions
    are in windows here and in micro-batches in the inner loader.
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

    def row_spec(self) -> Any:
        return self.loader.row_spec()

    def state(self, epoch: int, batch: int) -> Any:
        """The inner loader's state after `batch` windows (a short last window ends the epoch)."""
        return self.loader.state(epoch, batch * self.k)

    def restore(self, state: Any) -> None:
        self.loader.restore(state)
