"""NumPy data in memory: batches in a (seed, epoch) order, each process taking its own rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from meshfit.engine.data.placement import HostBatch, RowsFn


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The rows of `epoch` in training order: a permutation that depends only on (seed, epoch),
    not on the batch size, the strategy or the number of processes."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def num_batches(num_rows: int, batch_size: int, drop_last: bool) -> int:
    full, rem = divmod(num_rows, batch_size)
    return full + (1 if rem and not drop_last else 0)


def is_array_data(data: Any) -> bool:
    if isinstance(data, dict):
        return bool(data) and all(isinstance(v, np.ndarray) for v in data.values())
    if isinstance(data, tuple | list):
        return bool(data) and all(isinstance(v, np.ndarray) for v in data)
    return isinstance(data, np.ndarray)


class ArrayLoader:
    """Batches a tuple/dict (or a single array) of equal-length NumPy arrays.

    Its position is (epoch, batch) alone, so it has no iterator state to checkpoint."""

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
        self.data, self.batch_size, self.seed, self.name = data, batch_size, seed, name
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_rows = lengths.pop()
        if self.num_rows < batch_size and drop_last:
            raise ValueError(
                f"{name} has {self.num_rows} rows, fewer than one batch of {batch_size}, so an "
                f"epoch would have no step. Use batch_size <= {self.num_rows} or more data."
            )

    def __len__(self) -> int:
        return num_batches(self.num_rows, self.batch_size, self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.num_rows, self.seed, epoch, self.shuffle)

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

    def row_spec(self) -> Any:
        """Shape (without the row axis) and dtype of every leaf of one row."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), self.data)

    def state(self, epoch: int, batch: int) -> None:
        return None  # the position is the whole state

    def restore(self, state: Any) -> None:
        pass
