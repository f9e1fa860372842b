"""`strategy="auto"`: pick single / dp / fsdp from the train state's size and device memory.

The engine first builds a provisional strategy (single on one device, else dp) to trace the
abstract state, then calls `resolve_auto`, which may switch to FSDP before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from meshfit.strategies.base import Strategy
from meshfit.strategies.registry import resolve_strategy

#: Replicate (dp) only while state + gradients use at most this fraction of a device's memory;
#: the rest is left for activations, temporaries and the compiled program.
DP_MEMORY_FRACTION = 0.5


class AutoChoice(NamedTuple):
    name: str  # "single", "dp" or "fsdp"
    reason: str


def _bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _fmt(n: float) -> str:
    from meshfit.engine.hardware import format_bytes

    return format_bytes(n)


def device_memory_limit(devices: Sequence[Any]) -> int | None:
    """The smallest per-device memory over `devices`, or None where the platform reports none."""
    from meshfit.engine.hardware import device_memory

    limits = [device_memory(d) for d in devices]
    return None if not limits or None in limits else min(limits)


def choose_strategy(
    abstract_state: Any,
    num_devices: int,
    memory_per_device: int | None,
    fraction: float = DP_MEMORY_FRACTION,
) -> AutoChoice:
    """The decision and why, from parameter + optimizer-state bytes (plus a gradient-sized
    buffer) against one device's memory."""
    if num_devices == 1:
        return AutoChoice("single", "one device")
    state = _bytes(abstract_state)
    need = state + _bytes(abstract_state.params)  # the step also holds one set of gradients
    what = f"replicated state {_fmt(state)} + gradients = {_fmt(need)} per device"
    if memory_per_device is None:
        return AutoChoice(
            "dp", f"{what}; device memory is not reported on this platform, so dp is assumed to fit"
        )
    budget = fraction * memory_per_device
    if need <= budget:
        return AutoChoice(
            "dp",
            f"{what} fits in {fraction:.0%} of the {_fmt(memory_per_device)} per device",
        )
    return AutoChoice(
        "fsdp",
        f"{what} exceeds {fraction:.0%} of the {_fmt(memory_per_device)} per device; "
        f"sharding it over {num_devices} devices needs ~{_fmt(need / num_devices)} each",
    )


def resolve_auto(engine: Any, strategy: Strategy, abstract_state: Any) -> Strategy:
    """For `strategy="auto"`, the final strategy (set up on the engine's devices) once the
    abstract state is known; any other strategy is returned unchanged."""
    if engine.strategy_arg != "auto":
        return strategy
    devices = engine.devices
    choice = choose_strategy(abstract_state, len(devices), device_memory_limit(devices))
    if choice.name != strategy.name:
        strategy = resolve_strategy(choice.name, len(devices))
        strategy.setup(devices)
    if getattr(strategy, "auto_reason", None) != choice.reason:
        strategy.auto_reason = choice.reason
        if jax.process_index() == 0:
            print(f"[meshfit] strategy 'auto' -> {choice.name!r}: {choice.reason}", flush=True)
    return strategy
