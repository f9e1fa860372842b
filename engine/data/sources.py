"""Random-access sources (`len` + `source[i]` -> one record), batched like NumPy arrays.

A `grain.MapDataset`, a Hugging Face `datasets.Dataset` (numpy format) or any class with
`__len__` and `__getitem__`. Batches follow the same `(seed, epoch)` permutation as
`ArrayLoader`, each process reads only its own rows of each global batch, and no more than a
few batches are ever in memory. Reading runs on grain: a `MapDataset` of whole batches read
by threads (`ReadOptions`) or, with `Engine(data_workers=N)`, by N worker processes
(`mp_prefetch`), which keep going across epochs; a resume at (epoch, batch) starts reading
there (O(1): nothing before it is read).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from meshfit.engine.data import checks
from meshfit.engine.data.arrays import epoch_order, num_batches
from meshfit.engine.data.placement import HostBatch, RowsFn

READ_THREADS = 2  # threads reading batches when there are no worker processes
BUFFERED_BATCHES = 4  # batches read ahead per reader (thread pool or worker process)
_EPOCHS_AHEAD = 10**6  # the batch stream's length in epochs: practically endless


def is_source(data: Any) -> bool:
    """A random-access source: `len(data)` and `data[i]`, and not an array or a container."""
    if isinstance(data, np.ndarray | tuple | list | dict | str | bytes):
        return False
    if hasattr(data, "shape") and hasattr(data, "dtype"):  # an array (e.g. a jax.Array)
        return False
    return hasattr(type(data), "__len__") and hasattr(type(data), "__getitem__")


def ensure_grain_flags() -> None:
    """Grain reads absl flags (e.g. when it starts worker processes); outside `absl.app` they
    are unparsed and reading them raises. Mark them parsed with their defaults (a later
    `FLAGS(argv)` still parses a command line)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each worker process: exit when the training process is gone (after a SIGKILL
    nothing else would stop a worker, and it would hold the parent's pipes open forever)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="meshfit-parent-watch").start()


class BatchReader:
    """Element k = this process's rows of the k-th batch after position `base`, stacked.

    Plain data and picklable, so grain can hand it to worker processes. A grain `MapDataset`
    source is read at index `epoch * len + i`: grain wraps indices modulo the length (as its
    `repeat` does), so record i is the same, while a `random_map` draws new randomness each
    epoch, still a pure function of (seed, epoch, i)."""

    def __init__(
        self, source, spec, *, name, batch_size, seed, shuffle, drop_last, rows, base, cycle
    ):
        self.source, self.spec, self.name = source, spec, name
        self.n, self.batch_size, self.seed, self.shuffle = len(source), batch_size, seed, shuffle
        self.rows, self.base, self.cycle = (
            rows,
            base,
            cycle,
        )  # rows: {batch rows: (lo, hi, sharded)}
        self.batches = num_batches(self.n, batch_size, drop_last)
        self.offset_epochs = isinstance(source, grain.MapDataset)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.batches * _EPOCHS_AHEAD

    def position(self, k: int) -> tuple[int, int]:
        epoch, batch = self.base
        if self.cycle:  # validation: every pass is the same epoch
            return epoch, (batch + k) % self.batches
        return epoch + (batch + k) // self.batches, (batch + k) % self.batches

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.n, self.seed, epoch, self.shuffle)}
        return self._orders[epoch]

    def __getitem__(self, k: int) -> tuple[Any, int, bool]:
        epoch, i = self.position(k)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        lo, hi, sharded = self.rows[len(idx)]
        offset = epoch * self.n if self.offset_epochs else 0
        indices = [int(j) + offset for j in idx[lo:hi]]
        # One record at a time: batched reads are not always the same records (a Hugging Face
        # Dataset's __getitems__ turns int32 columns into int64).
        records = [self.source[j] for j in indices]
        return stack_records(records, indices, self.spec, self.n, self.name), len(idx), sharded


def record_spec(record: Any, index: int, name: str) -> tuple[Any, list[tuple]]:
    """(structure, [(shape, dtype) per leaf]) of one record, after checking its leaves."""
    checks.check_record_leaves(record, index, name)
    leaves, treedef = jax.tree.flatten(record)
    return treedef, [(np.shape(x), np.asarray(x).dtype) for x in leaves]


def stack_records(records: list, indices: list[int], spec, n: int, name: str) -> Any:
    """One batch: each leaf of the records stacked along a new row axis."""
    treedef, shapes = spec
    columns: list[list] = [[] for _ in shapes]
    for record, index in zip(records, indices):
        leaves, structure = jax.tree.flatten(record)
        if structure != treedef or any(
            np.shape(x) != s or np.asarray(x).dtype != d for x, (s, d) in zip(leaves, shapes)
        ):
            got = record_spec(record, index % n, name)
            raise checks.record_mismatch(name, index % n, got, spec)
        for column, leaf in zip(columns, leaves):
            column.append(leaf)
    return jax.tree.unflatten(treedef, [np.stack(c) for c in columns])


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for loader in list(_LIVE):
        loader.close()


class SourceLoader:
    """Batches a random-access source exactly as `ArrayLoader` batches arrays."""

    def __init__(
        self, source, batch_size, *, shuffle, drop_last, seed, name, workers=0, threads=None
    ):
        self.source, self.batch_size, self.seed, self.name = source, batch_size, seed, name
        self.shuffle, self.drop_last, self.workers = shuffle, drop_last, workers
        self.threads = (1 if workers else READ_THREADS) if threads is None else threads
        self.num_rows = len(source)
        if (self.num_rows < batch_size and drop_last) or self.num_rows == 0:
            raise ValueError(
                f"{name} has {self.num_rows} records, fewer than one batch of {batch_size}, so "
                f"an epoch would have no step. Use batch_size <= {self.num_rows} or more data."
            )
        self.spec = record_spec(source[0], 0, name)
        self._stream: dict[str, Any] | None = None
        _LIVE.add(self)

    def __len__(self) -> int:
        return num_batches(self.num_rows, self.batch_size, self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.num_rows, self.seed, epoch, self.shuffle)

    def row_spec(self) -> Any:
        treedef, shapes = self.spec
        return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])

    def epoch(
        self, epoch: int, start: int = 0, rows_for: RowsFn | None = None
    ) -> Iterator[HostBatch]:
        """Host batches of `epoch` from batch `start`, continuing the running stream when it
        is at that position (no restart of the readers between epochs)."""
        rows_for = rows_for or (lambda n: (0, n, True))
        full, rem = divmod(self.num_rows, self.batch_size)
        sizes = ([self.batch_size] if full else []) + ([rem] if rem and not self.drop_last else [])
        rows = {n: rows_for(n) for n in sizes}
        stream = self._stream
        if stream is None or stream["next"] != (epoch, start) or stream["rows"] != rows:
            stream = self._open(epoch, start, rows)
        for i in range(start, len(self)):
            local, global_size, sharded = next(stream["iterator"])
            last = i + 1 == len(self)
            stream["next"] = (epoch if self.cycle else epoch + 1, 0) if last else (epoch, i + 1)
            yield HostBatch(local, global_size, sharded)

    @property
    def cycle(self) -> bool:
        return not self.shuffle  # validation/prediction: each pass is epoch 0 again

    def _open(self, epoch: int, start: int, rows: dict) -> dict[str, Any]:
        self.close()
        reader = BatchReader(
            self.source, self.spec, name=self.name, batch_size=self.batch_size,
            seed=self.seed, shuffle=self.shuffle, drop_last=self.drop_last, rows=rows,
            base=(epoch, start),
            cycle=self.cycle,
        )  # fmt: skip
        ds = grain.MapDataset.source(reader).to_iter_dataset(
            grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=BUFFERED_BATCHES)
        )
        if self.workers:
            ensure_grain_flags()
            options = grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=BUFFERED_BATCHES
            )
            ds = ds.mp_prefetch(options, worker_init_fn=_exit_with_parent)
        self._stream = {"iterator": iter(ds), "next": (epoch, start), "rows": rows}
        return self._stream

    def close(self) -> None:
        """Stop the readers (worker processes, threads) of the running stream."""
        stream, self._stream = self._stream, None
        if stream is not None and hasattr(stream["iterator"], "close"):
            stream["iterator"].close()

    def state(self, epoch: int, batch: int) -> None:
        return None  # the position is the whole state: the order is a function of (seed, epoch)

    def restore(self, state: Any) -> None:
        pass
