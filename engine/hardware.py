"""Hardware facts: platform, device kind, device and process counts, memory per device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def device_memory(device: Any) -> int | None:
    """The allocator limit of one device in bytes (`memory_stats()['bytes_limit']`), if known."""
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"])


def hardware_info(devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Facts about the devices a run uses (default: all global devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    first = devices[0]
    memory = [device_memory(d) for d in devices]
    return {
        "platform": first.platform,
        "device_kind": first.device_kind,
        "devices": len(devices),
        "local_devices": sum(d.process_index == jax.process_index() for d in devices),
        "global_devices": jax.device_count(),
        "processes": jax.process_count(),
        "process_index": jax.process_index(),
        "memory_per_device": None if None in memory else min(memory),
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


def print_hardware_report(engine: Any) -> None:
    """Print the report once per fit on process 0 (called by the engine at fit start)."""
    if engine.is_global_zero:
        print(hardware_report(engine.devices), flush=True)
