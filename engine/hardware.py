"""Hardware facts, in one place: devices, their memory, and what a compiled program needs
(XLA's memory and cost analyses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def memory_stats(device: Any) -> dict[str, Any] | None:
    """The allocator statistics of `device`, or None where the platform reports none (CPU)."""
    try:
        return device.memory_stats() or None
    except (NotImplementedError, RuntimeError, AttributeError):
        return None


def device_memory(device: Any) -> int | None:
    """The allocator limit of one device in bytes (`memory_stats()['bytes_limit']`), if known."""
    stats = memory_stats(device)
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def min_device_memory(devices: Sequence[Any]) -> int | None:
    """The smallest allocator limit over `devices`, or None if any of them reports none."""
    limits = [device_memory(d) for d in devices]
    return None if not limits or None in limits else min(limits)


def compiled_memory(compiled: Any) -> int | None:
    """Per-device bytes a compiled executable needs while it runs (arguments + outputs - donated
    aliases + temporaries + code), from XLA's static analysis; None where unavailable."""
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes
        )
    except Exception:  # not every backend implements it
        return None


def compiled_flops(compiled: Any, num_devices: int = 1) -> float | None:
    """FLOPs of one call of `compiled` over `num_devices` (`cost_analysis()` is per device)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) * num_devices if flops and flops > 0 else None


def hardware_info(devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Facts about the devices a run uses (default: all global devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    first = devices[0]
    return {
        "platform": first.platform,
        "device_kind": first.device_kind,
        "devices": len(devices),
        "local_devices": sum(d.process_index == jax.process_index() for d in devices),
        "global_devices": jax.device_count(),
        "processes": jax.process_count(),
        "process_index": jax.process_index(),
        "memory_per_device": min_device_memory(devices),
    }


def format_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def hardware_report(devices: Sequence[Any] | None = None) -> str:
    """A compact, printable block of `hardware_info`."""
    info = hardware_info(devices)
    return (
        f"[meshfit] hardware: {info['platform']} ({info['device_kind']}), "
        f"{info['devices']} device(s) in use, {info['local_devices']} local / "
        f"{info['global_devices']} global, {info['processes']} process(es), "
        f"memory per device {format_bytes(info['memory_per_device'])}"
    )
