"""Placement strategies: `strategy="single" | "dp" | ...` or a Strategy object."""

from meshfit.strategies.base import Strategy, make_mesh
from meshfit.strategies.data_parallel import DataParallel
from meshfit.strategies.fsdp import FSDP
from meshfit.strategies.hybrid import Hybrid
from meshfit.strategies.pipeline import Pipeline
from meshfit.strategies.registry import (
    available_strategies,
    register_strategy,
    resolve_strategy,
)
from meshfit.strategies.single import SingleDevice

register_strategy("single", SingleDevice)
register_strategy("dp", DataParallel)
register_strategy("ddp", DataParallel)
register_strategy("pipeline", Pipeline)
register_strategy("fsdp", FSDP)
register_strategy("hybrid", Hybrid)

__all__ = [
    "FSDP",
    "DataParallel",
    "Hybrid",
    "Pipeline",
    "SingleDevice",
    "Strategy",
    "available_strategies",
    "make_mesh",
    "register_strategy",
    "resolve_strategy",
]
