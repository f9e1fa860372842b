"""`Throughput`: steps/s, samples/s, FLOPs per step and MFU, measured at the log cadence."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax

from meshfit.engine.hardware import compiled_flops
from meshfit.engine.hooks import Callback

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

#: Dense peak FLOP/s per chip: (substring of `device.device_kind`, lowercase; bf16/fp16 peak;
#: fp32 peak: TF32 tensor cores on NVIDIA, bf16 passes on TPU). First match wins.
PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("b200", 2.25e15, 1.1e15),
    ("h200", 989e12, 494e12),
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989e12, 494e12),
    ("h800", 989e12, 494e12),
    ("a100", 312e12, 156e12),
    ("a800", 312e12, 156e12),
    ("l40s", 362e12, 183e12),
    ("l4", 121e12, 60e12),
    ("v100", 125e12, 15.7e12),
    ("tpu v6", 918e12, 918e12),
    ("tpu v5 lite", 197e12, 197e12),
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5p", 459e12, 459e12),
    ("tpu v5", 459e12, 459e12),
    ("tpu v4", 275e12, 275e12),
    ("tpu v3", 123e12, 123e12),
    ("tpu v2", 45e12, 45e12),
)


def peak_flops(device: Any, precision: str = "bf16") -> float | None:
    """Known dense peak FLOP/s of one `device` at `precision`, or None (e.g. on CPU)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    low = precision in ("bf16", "fp16", "16")
    for pattern, half, single in PEAK_FLOPS:
        if pattern in kind:
            return half if low else single
    return None


def _rows(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    return int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else 0


class Throughput(Callback):
    """Logs, every `log_every_n_steps`, the throughput of the steps since the previous log:

    - `steps_per_sec`, `samples_per_sec` (global rows per second);
    - `flops_per_step` (all devices) from `flops_per_step=`, else the module's
      `flops_per_step` attribute, else the compiled step's `cost_analysis()`;
    - `mfu`: model FLOPs utilization, `flops_per_step * steps_per_sec / (peak * devices)`,
      when the device's peak is known (`PEAK_FLOPS`, or `peak_flops=` per device).

    Times are host `perf_counter` readings at log steps, where the engine has just read the
    metrics (so every step dispatched so far has finished): no extra device sync. Validation
    time is left out. The metrics go through `engine.log_metrics` (TensorBoard, progress bar).
    """

    fusion_safe = True  # its batch hooks are right when replayed after a fused dispatch
    observes_only = True  # its log and batch-end hooks never steer the run

    def __init__(self, flops_per_step: float | None = None, peak_flops: float | None = None):
        for name, value in (("flops_per_step", flops_per_step), ("peak_flops", peak_flops)):
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"Throughput({name}={value!r}): expected a positive number.")
        self.flops_per_step_arg, self.peak_flops_arg = flops_per_step, peak_flops
        self.flops_per_step: float | None = None
        self.peak_flops: float | None = None  # per device
        self.num_devices = 1
        self.history: list[dict[str, float]] = []  # (step, metrics) of every logged window
        self._start = self._val_start = 0.0
        self._start_step = self._samples = 0

    def on_fit_start(self, engine: Engine) -> None:
        devices = engine.mesh.devices.flat
        self.num_devices = engine.mesh.devices.size
        declared = getattr(engine.module, "flops_per_step", None)
        self.flops_per_step = (
            self.flops_per_step_arg
            or (float(declared) if declared else None)
            or compiled_flops(engine.compiled_step, self.num_devices)
        )
        self.peak_flops = self.peak_flops_arg or peak_flops(next(iter(devices)), engine.precision)
        self.history = []
        self._reset(engine)

    def _reset(self, engine: Engine) -> None:
        self._start, self._start_step, self._samples = time.perf_counter(), engine.global_step, 0

    def on_train_batch_end(self, engine: Engine, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._samples += _rows(batch)
        if engine.global_step % engine.log_every_n_steps:
            return
        now = time.perf_counter()
        seconds = now - self._start
        steps = engine.global_step - self._start_step
        if steps <= 0 or seconds <= 0:
            return
        metrics = {"steps_per_sec": steps / seconds, "samples_per_sec": self._samples / seconds}
        if self.flops_per_step:
            metrics["flops_per_step"] = self.flops_per_step
            if self.peak_flops:
                achieved = self.flops_per_step * metrics["steps_per_sec"]
                metrics["mfu"] = achieved / (self.peak_flops * self.num_devices)
        self.history.append({"step": float(engine.global_step), **metrics})
        self._start, self._start_step, self._samples = now, engine.global_step, 0
        engine.log_metrics(metrics)

    def on_validation_start(self, engine: Engine) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, engine: Engine) -> None:
        self._start += time.perf_counter() - self._val_start  # validation is not throughput
