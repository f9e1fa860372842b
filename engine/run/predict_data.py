"""Batches for `Engine.predict`: every input row, each batch padded to the batch layout (the
pad repeats the batch's last row), with what is needed to drop the padding on the host."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from meshfit.engine.data import ArrayLoader, HostBatch, IterableLoader, RowsFn


class PaddedBatch(NamedTuple):
    """One padded global batch as this process sees it.

    `lo`: this process's first row in the padded global batch; `real`: how many of its rows
    (from `lo`) are data; `keep`: (start, count) spans of the gathered global batch that are
    data, in output order; `offset`: the output row index of this process's first real row.
    """

    host: HostBatch
    lo: int
    real: int
    keep: list[tuple[int, int]]
    offset: int


def _pad_rows(tree: Any, rows: int) -> Any:
    """`tree`'s leaves grown to `rows` rows by repeating their last row."""

    def pad(x: np.ndarray) -> np.ndarray:
        if len(x) == rows:
            return x
        return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])

    return jax.tree.map(pad, tree)


def array_batches(loader: ArrayLoader, rows_for: RowsFn) -> Iterator[PaddedBatch]:
    """In-order batches of `batch_size` rows over NumPy data; the last one padded."""
    leaves, treedef = jax.tree.flatten(loader.data)
    size, total = loader.batch_size, loader.num_rows
    lo, hi, sharded = rows_for(size)
    for start in range(0, total, size):
        count = min(size, total - start)
        idx = np.minimum(np.arange(start + lo, start + hi), total - 1)
        local = jax.tree.unflatten(treedef, [x[idx] for x in leaves])
        real = int(np.clip(count - lo, 0, hi - lo))
        yield PaddedBatch(HostBatch(local, size, sharded), lo, real, [(0, count)], start + lo)


def iterable_batches(
    loader: IterableLoader, rows_for: RowsFn, multiple: Callable[[int], int]
) -> Iterator[PaddedBatch]:
    """Each batch of an iterable, padded to the largest global batch so far (rounded up by
    `multiple` to what the strategy can split), so a short last batch reuses the compiled step.
    With several processes, the real row counts are exchanged to place the output rows."""
    processes, target, done = loader.process_count, 0, 0
    for batch in loader.data:
        batch = jax.tree.map(np.asarray, batch)
        leaves = jax.tree.leaves(batch)
        count = len(leaves[0]) if leaves and np.ndim(leaves[0]) else 0
        if count == 0:
            raise ValueError(
                "predict data yielded a batch without rows (empty, or a scalar leaf); every "
                "leaf of a batch needs a leading row dimension."
            )
        if count * processes > target:
            target = multiple(count * processes)
        lo = rows_for(target)[0]
        local = _pad_rows(batch, target // processes)
        if processes > 1:
            spans = multihost_utils.process_allgather(np.array([lo, count]))
            keep = sorted((int(a), int(n)) for a, n in np.asarray(spans).reshape(-1, 2))
        else:
            keep = [(0, count)]
        offset = done + sum(n for a, n in keep if a < lo)
        done += sum(n for _, n in keep)
        yield PaddedBatch(HostBatch(local, target, True), lo, count, keep, offset)


def signature(tree: Any) -> tuple[Any, tuple]:
    """A batch's structure without its row count: treedef, per-leaf trailing shape and dtype."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x)[1:], np.asarray(x).dtype) for x in leaves)


def check_same_structure(first: Any, batch: Any, index: int) -> None:
    """A clear error when batch `index` is not structured like the first batch."""
    if signature(first) != signature(batch):
        show = lambda t: jax.tree.map(lambda x: f"{np.asarray(x).dtype}{list(np.shape(x))}", t)  # noqa: E731
        raise ValueError(
            f"predict data: batch {index} has the structure {show(batch)}, but the first batch "
            f"has {show(first)}. Every batch needs the same leaves, trailing shapes and dtypes "
            "(only the number of rows may differ)."
        )
