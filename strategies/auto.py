"""`strategy="auto"`: pick single / dp / fsdp from the train state's size and device memory.

The engine first builds a provisional strategy (single on one device, else dp) to trace the
abstract state, then calls `choose`, which may pick FSDP before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from meshfit.engine.hardware import format_bytes, min_device_memory
from meshfit.engine.trees import tree_bytes
from meshfit.strategies.base import Strategy
from meshfit.strategies.registry import resolve_strategy

#: Replicate (dp) only while state + gradients use at most this fraction of a device's memory;
#: the rest is left for activations, temporaries and the compiled program.
DP_MEMORY_FRACTION = 0.5


class AutoChoice(NamedTuple):
    name: str  # "single", "dp" or "fsdp"
    reason: str


#: The smallest per-device memory over the devices (None where unreported); a module attribute
#: so tests can pretend a memory size.
device_memory_limit = min_device_memory


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
    state = tree_bytes(abstract_state)
    need = state + tree_bytes(abstract_state.params)  # the step also holds one set of gradients
    what = f"replicated state {format_bytes(state)} + gradients = {format_bytes(need)} per device"
    if memory_per_device is None:
        return AutoChoice(
            "dp", f"{what}; device memory is not reported on this platform, so dp is assumed to fit"
        )
    budget = fraction * memory_per_device
    if need <= budget:
        return AutoChoice(
            "dp",
            f"{what} fits in {fraction:.0%} of the {format_bytes(memory_per_device)} per device",
        )
    return AutoChoice(
        "fsdp",
        f"{what} exceeds {fraction:.0%} of the {format_bytes(memory_per_device)} per device; "
        f"sharding it over {num_devices} devices needs ~{format_bytes(need / num_devices)} each",
    )


def choose(abstract_state: Any, devices: Sequence[Any]) -> tuple[Strategy, str]:
    """The strategy "auto" picks for this state on these devices (set up on them), and why."""
    choice = choose_strategy(abstract_state, len(devices), device_memory_limit(devices))
    strategy = resolve_strategy(choice.name, len(devices))
    strategy.setup(devices)
    return strategy, choice.reason
