"""`DeviceStatsMonitor`: per-device memory in use and peak, at the log cadence."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import jax

from meshfit.engine.hardware import memory_stats
from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

#: `memory_stats()` entries logged, and the metric suffix each is logged under.
STATS = {"bytes_in_use": "bytes_in_use", "peak_bytes_in_use": "peak_bytes_in_use"}


def local_devices(engine: Engine) -> list[Any]:
    """This process's devices of the run (only their memory can be read here)."""
    return [d for d in engine.mesh.devices.flat if d.process_index == jax.process_index()]


class DeviceStatsMonitor(Callback):
    """Logs `memory/device_<id>/bytes_in_use` and `memory/device_<id>/peak_bytes_in_use`
    for each local device every `log_every_n_steps`, plus `memory/max_bytes_in_use` (the
    largest over devices). Reading allocator statistics does not sync the device.

    On platforms whose `memory_stats()` is None (the CPU backend) nothing is logged; a
    warning says so once, at the start of fit.
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    observes_only = True  # its log and batch-end hooks never steer the run

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def on_fit_start(self, engine: Engine) -> None:
        self.last = {}
        devices = local_devices(engine)
        if devices and all(memory_stats(d) is None for d in devices):
            warnings.warn(
                f"DeviceStatsMonitor: {devices[0].platform} devices do not report memory_stats(); "
                "no device memory will be logged.",
                stacklevel=2,
            )

    def collect(self, engine: Engine) -> dict[str, float]:
        """Current statistics of every local device that reports them."""
        out: dict[str, float] = {}
        for device in local_devices(engine):
            stats = memory_stats(device)
            for key, suffix in STATS.items():
                if stats and key in stats:
                    out[f"memory/device_{device.id}/{suffix}"] = float(stats[key])
        in_use = [v for k, v in out.items() if k.endswith("/bytes_in_use")]
        if in_use:
            out["memory/max_bytes_in_use"] = max(in_use)
        return out

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        if engine.global_step % engine.log_every_n_steps == 0:
            self.last = self.collect(engine)
            engine.log_metrics(self.last)
