"""The training loader's state in checkpoints: saved per process in the meta, restored by
each process for itself.

`loader.state(epoch, batch)` is the state after the `batch` batches that dispatched steps
consumed, not after the batches the Prefetcher has read ahead. Each process's state is
JSON; with several processes they are all-gathered (JSON bytes padded to a common length) so
process 0, which writes the meta, holds every one of them.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from meshfit.engine.processes import distributed


def _allgather_json(value: Any) -> list[Any]:
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray(blob.size, np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(rows[i, : int(n)].tobytes()) for i, n in enumerate(sizes.tolist())]


def data_state(loader: Any, position: tuple[int, int]) -> dict[str, Any] | None:
    """{"states": [one per process]} for a loader with iterator state; None otherwise."""
    state = None if loader is None else loader.state(*position)
    if state is None:
        return None
    states = _allgather_json(state) if distributed.process_count() > 1 else [state]
    return {"states": states}


def restore_data_state(loader: Any, meta: dict[str, Any]) -> None:
    """Give the training loader this process's saved state (or just the position)."""
    if loader is None:
        return
    position = {"epoch": int(meta["current_epoch"]), "batch": int(meta["batch_idx"])}
    states = (meta.get("data") or {}).get("states")
    count, rank = distributed.process_count(), distributed.process_index()
    if states is not None and len(states) != count:
        warnings.warn(
            f"The checkpoint holds data-iterator states of {len(states)} processes; this run "
            f"has {count}, so they cannot be matched and the data position is replayed.",
            stacklevel=2,
        )
        states = None
    loader.restore(states[rank] if states else {**position, "iterator": None})
