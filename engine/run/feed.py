"""`TrainFeed`: where a fit's training batches come from, per dispatch: the arrays kept on the
device (gathered there through the epoch's permutation) or host batches stacked K at a time."""

from __future__ import annotations

from typing import Any

import jax

from meshfit.engine.processes import distributed
from meshfit.engine.run import device_data
from meshfit.engine.run.dispatch import HostGroups
from meshfit.engine.step.fused import stacked_sharding


class TrainFeed:
    """Chooses the data path once (`data_on_device`), then serves each epoch's dispatches."""

    def __init__(self, engine: Any, loader: Any, placer: Any, host_batches: bool = False):
        """`host_batches`: a callback reads each step's batch, so "auto" keeps it on the host."""
        self.loader, self.placer, self.strategy = loader, placer, engine.strategy
        setting = engine.config.data_on_device
        keep = device_data.choose(
            False if host_batches and setting == "auto" else setting,
            loader,
            distributed.process_count(),
            engine.devices,
        )
        self.device_data = device_data.DeviceData(loader, self.strategy) if keep else None

    def epoch(self, engine: Any, first_batches: tuple | None) -> Any:
        """`take(k) -> (xs, steps, one step's shapes)` over this epoch from the data position;
        `first_batches` is `(epoch, start, batches)` already begun (the example batch)."""
        epoch, start = engine.current_epoch, engine.batch_idx
        data = self.device_data
        if data is not None:

            def take(k: int) -> tuple[Any, int, Any]:
                k = min(k, len(data) - engine.batch_idx)
                return data.xs(epoch, engine.batch_idx), max(k, 0), data.step_shapes()

            return take
        if first_batches and first_batches[:2] == (epoch, start):
            batches = first_batches[2]
        else:
            batches = self.loader.epoch(epoch, start, self.placer.rows_for)
        return HostGroups(batches, self.strategy).take

    def abstract_xs(self, batch_example: Any) -> Any:
        """A one-step dispatch's batch source as shapes and shardings (to compile it)."""
        if self.device_data is not None:
            return self.device_data.xs(0, 0)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                (1, *x.shape), x.dtype, sharding=stacked_sharding(self.strategy, x.ndim + 1)
            ),
            batch_example,
        )
