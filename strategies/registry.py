"""Strategy names -> classes with preset arguments; `resolve` turns a name or object into one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshfit.strategies.base import Strategy

_REGISTRY: dict[str, tuple[Callable[..., Strategy], dict[str, Any]]] = {}


def register_strategy(name: str, factory: Callable[..., Strategy], **preset: Any) -> None:
    """Make `strategy=name` build `factory(**preset)`."""
    _REGISTRY[name] = (factory, preset)


def available_strategies() -> list[str]:
    return sorted([*_REGISTRY, "auto"])


def resolve_strategy(strategy: str | Strategy, num_devices: int) -> Strategy:
    """A strategy object from a name (or the object itself)."""
    if isinstance(strategy, Strategy):
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(
            f"strategy must be a name or a Strategy object, got {type(strategy).__name__}. "
            f"Valid names: {', '.join(available_strategies())}."
        )
    if strategy == "auto":
        strategy = "single" if num_devices == 1 else "dp"
    if strategy not in _REGISTRY:
        raise ValueError(
            f"Unknown strategy {strategy!r}. Valid names: {', '.join(available_strategies())}; "
            "or pass a Strategy object, e.g. strategy=DataParallel()."
        )
    factory, preset = _REGISTRY[strategy]
    return factory(**preset)
