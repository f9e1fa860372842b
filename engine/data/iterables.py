"""Iterables of batches: replayed from the epoch's start on resume, unless their iterator has
state (`get_state`/`set_state`, as grain's, or `state_dict`/`load_state_dict`): then the state
after the last batch a dispatched step consumed is checkpointed and restored, nothing replayed.
"""

from __future__ import annotations

import base64
import collections
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from meshfit.engine.data import checks
from meshfit.engine.data.placement import HostBatch, RowsFn

# States kept for the newest batches handed out: enough for the Prefetcher's read-ahead and
# gradient accumulation windows (k batches per step).
STATES_KEPT = 1024
_END = object()


@dataclass(frozen=True)
class PerProcess:
    """Marks an iterable whose batches hold only this process's rows of each global batch
    (the global batch is assembled from every process's part)."""

    batches: Iterable[Any]


def _methods(it: Any) -> tuple[Any, Any] | None:
    """(get, set) of an iterator's state, or None for a plain iterator."""
    for get, put in (("get_state", "set_state"), ("state_dict", "load_state_dict")):
        if callable(getattr(it, get, None)) and callable(getattr(it, put, None)):
            return getattr(it, get), getattr(it, put)
    return None


def to_json(x: Any) -> Any:
    """An iterator state as JSON values (bytes and non-string dict keys kept exactly)."""
    if isinstance(x, bytes):
        return {"__bytes__": base64.b64encode(x).decode()}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: to_json(v) for k, v in x.items()}
        return {"__items__": [[to_json(k), to_json(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [to_json(v) for v in x]}
    if isinstance(x, list):
        return [to_json(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, str | int | float | bool):
        return x
    raise TypeError(
        f"The data iterator's state holds a {type(x).__name__}, which a checkpoint cannot "
        "store (its meta is JSON). Return JSON-compatible values (dicts, lists, numbers, "
        "strings, bytes) from get_state()/state_dict()."
    )


def from_json(x: Any) -> Any:
    if isinstance(x, list):
        return [from_json(v) for v in x]
    if not isinstance(x, dict):
        return x
    if "__bytes__" in x:
        return base64.b64decode(x["__bytes__"])
    if "__items__" in x:
        return {from_json(k): from_json(v) for k, v in x["__items__"]}
    if "__tuple__" in x:
        return tuple(from_json(v) for v in x["__tuple__"])
    return {k: from_json(v) for k, v in x.items()}


class IterableLoader:
    """Batches from an iterable, one fresh `iter(data)` per epoch. In several processes each
    yields its own rows (`PerProcess`); the global batch has `rows * process_count` rows."""

    def __init__(self, data: Iterable[Any], process_count: int, name: str, train: bool = True):
        if not isinstance(data, Iterable):
            raise TypeError(f"{name} must be {checks.ACCEPTED}; got {type(data).__name__}.")
        self.data, self.process_count, self.name, self.train = data, process_count, name, train
        self._states: collections.deque = collections.deque(maxlen=STATES_KEPT)
        self._restored: dict[str, Any] | None = None
        self.stateful: bool | None = None  # known once the first iterator exists

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def _open(self, epoch: int, start: int) -> tuple[Iterator[Any], int]:
        """A fresh iterator at batch `start`: its restored state, or `start` batches to skip."""
        it = iter(self.data)
        methods = _methods(it)
        self.stateful = methods is not None
        saved, self._restored = self._restored, None
        at = saved and (saved["epoch"], saved["batch"]) == (epoch, start)
        if start and methods and at and saved.get("iterator") is not None:
            methods[1](from_json(saved["iterator"]))
            return it, 0
        return it, start

    def epoch(
        self, epoch: int, start: int = 0, rows_for: RowsFn | None = None
    ) -> Iterator[HostBatch]:
        it, skip = self._open(epoch, start)
        get_state = (_methods(it) or (None,))[0]
        self._states.clear()
        for _ in range(skip):  # replay (a plain iterable has no state to restore)
            if next(it, _END) is _END:
                return
        i = start
        while (batch := next(it, _END)) is not _END:
            batch = jax.tree.map(np.asarray, batch)
            host = self._host_batch(batch, epoch, i, rows_for)
            i += 1
            if get_state is not None:
                self._states.append(((epoch, i), to_json(get_state())))
            yield host

    def _host_batch(self, batch: Any, epoch: int, i: int, rows_for: RowsFn | None) -> HostBatch:
        leaves = jax.tree.leaves(batch)
        rows = {len(x) for x in leaves if np.ndim(x)}
        if len(rows) != 1:
            shapes = jax.tree.map(np.shape, batch)
            raise ValueError(
                f"{self.name}: batch {i} of epoch {epoch} has arrays with different numbers of "
                f"rows (shapes {shapes}). Every array of a batch needs the same leading "
                "dimension."
            )
        global_size = rows.pop() * self.process_count
        sharded = True
        if rows_for is not None and not rows_for(global_size)[2]:
            shards = getattr(getattr(rows_for, "__self__", None), "data_shards", None)
            if self.train:
                raise checks.indivisible(
                    self.name, epoch, i, global_size, shards, "every training step shards it"
                )
            if self.process_count > 1:
                raise checks.indivisible(
                    self.name, epoch, i, global_size, shards, "each process holds only its rows"
                )
            sharded = False  # a validation batch the devices cannot split: replicated
        return HostBatch(batch, global_size, sharded)

    def row_spec(self) -> Any:
        """Per-row shapes of the first batch of a re-iterable (None for a one-shot iterator,
        whose first batch would be lost)."""
        it = iter(self.data)
        if it is self.data:
            return None
        first = next(it, None)
        if hasattr(it, "close"):
            it.close()
        if first is None:
            return None
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], np.asarray(x).dtype), first
        )

    def state(self, epoch: int, batch: int) -> dict[str, Any]:
        """The position and, for a stateful iterator, its state after `batch` batches."""
        found = next((s for pos, s in reversed(self._states) if pos == (epoch, batch)), None)
        return {"epoch": epoch, "batch": batch, "iterator": found}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Use `state` when the next epoch starts at its position; warn about a replay."""
        self._restored = state
        batch = (state or {}).get("batch", 0)
        if state is not None and batch and state.get("iterator") is None:
            warnings.warn(
                f"Resuming {self.name} at batch {batch} of epoch {state['epoch']}: it is a plain "
                f"iterable without iterator state, so its first {batch} batches will be read "
                "again and discarded. To resume without replay, pass a grain.IterDataset / "
                "grain.DataLoader, an iterable whose iterator has get_state()/set_state() or "
                "state_dict()/load_state_dict(), NumPy arrays or a random-access source.",
                stacklevel=2,
            )
