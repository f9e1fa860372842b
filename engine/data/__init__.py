"""Feeding data: loaders turn what `fit` was given into host batches; the Placer turns those
into global arrays on the mesh, a few steps ahead.

A loader has `epoch(epoch, start, rows_for) -> Iterator[HostBatch]` (the batches of `epoch`
from batch `start`, each process taking the rows `rows_for(global_rows)` names), `len()`
(batches per epoch; TypeError when unknown), `row_spec()` (one row's shapes, for checks), and
`state(epoch, batch)` / `restore(state)` (JSON: what a checkpoint needs beyond the position).

- `arrays`: NumPy arrays in memory (`ArrayLoader`).
- `sources`: random-access sources read by grain (`SourceLoader`).
- `iterables`: iterables of batches, with or without iterator state (`IterableLoader`).
- `windows`: gradient-accumulation windows (`MicroBatchWindows`).
- `placement`: `Placer`, `Prefetcher`; `checks`: bad-input errors; `resume`: checkpoint state.
"""

from meshfit.engine.data.arrays import ArrayLoader, epoch_order
from meshfit.engine.data.iterables import IterableLoader, PerProcess
from meshfit.engine.data.loaders import make_loader
from meshfit.engine.data.placement import HostBatch, Placer, Prefetcher, RowsFn
from meshfit.engine.data.sources import SourceLoader
from meshfit.engine.data.windows import MicroBatches, MicroBatchWindows

__all__ = [
    "ArrayLoader",
    "HostBatch",
    "IterableLoader",
    "MicroBatchWindows",
    "MicroBatches",
    "PerProcess",
    "Placer",
    "Prefetcher",
    "RowsFn",
    "SourceLoader",
    "epoch_order",
    "make_loader",
]
