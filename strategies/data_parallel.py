"""Data parallelism: the state replicated on every device, the batch split across them."""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from meshfit.strategies.base import Strategy, make_mesh


class DataParallel(Strategy):
    """Replicate parameters and optimizer state; shard the batch over a `data` axis.

    XLA inserts the gradient all-reduce; there is no hand-written collective.
    """

    name = "dp"

    def build_mesh(self, devices: list[Any]) -> Mesh:
        return make_mesh((len(devices),), ("data",), devices)
