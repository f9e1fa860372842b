"""Placement strategies: `strategy="single" | "dp" | ...` or a Strategy object."""

from meshfit.strategies.base import Strategy, make_mesh
from meshfit.strategies.data_parallel import DataParallel
from meshfit.strategies.registry import (
    available_strategies,
    register_strategy,
    resolve_strategy,
)
from meshfit.strategies.single import SingleDevice

register_strategy("single", SingleDevice)
register_strategy("dp", DataParallel)
register_strategy("ddp", DataParallel)

__all__ = [
    "DataParallel",
    "SingleDevice",
    "Strategy",
    "available_strategies",
    "make_mesh",
    "register_strategy",
    "resolve_strategy",
]
