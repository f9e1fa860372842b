"""One device: the baseline every other strategy must match."""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from meshfit.strategies.base import Strategy, make_mesh


class SingleDevice(Strategy):
    """Everything on one device (the first of those given, or `device`)."""

    name = "single"

    def __init__(self, device: Any = None):
        self.device = device

    def build_mesh(self, devices: list[Any]) -> Mesh:
        return make_mesh((1,), ("data",), [self.device if self.device is not None else devices[0]])
