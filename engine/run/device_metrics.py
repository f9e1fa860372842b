"""Training metrics accumulated on the device across dispatches, read once per log."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from meshfit.engine.module import MetricMeta
from meshfit.engine.step.fused import COUNT, empty_metrics


class DeviceMetrics:
    """The device-side accumulator of the steps since the last log (a small pytree the fused
    dispatch carries); `compute` is the one host read per log. After a read, `acc` still holds
    the read window and `fresh` tells the next dispatch to start from empty.

    Each metric combines with its own reduction: "mean" (a float32 sum over the steps,
    divided by their count on the host), "sum", "max", "min".
    """

    def __init__(self, meta: dict[str, MetricMeta], names: Any, replicated: Any):
        self.meta, self.replicated = meta, replicated
        host = jax.device_get(empty_metrics(meta, dict.fromkeys(names)))
        self._empty = {k: np.asarray(v) for k, v in host.items()}
        self.acc: dict[str, jax.Array] = self._fresh({})
        self.fresh = False  # `acc` was read: the next dispatch starts a new window
        self.steps = 0  # host count of the steps in the window (never read from the device)

    def _fresh(self, values: dict[str, Any]) -> dict[str, jax.Array]:
        host = dict(self._empty)
        for name, value in (values or {}).items():
            if name in host:
                host[name] = np.asarray(value, np.float32)
        return jax.device_put(host, self.replicated)  # one transfer

    def __len__(self) -> int:
        return self.steps

    def update(self, acc: dict[str, jax.Array], steps: int, closed_after: int | None = None):
        """The accumulator a dispatch of `steps` steps returned; `closed_after`: the dispatch
        closed its last window after that many steps (the rest are in `acc`)."""
        base = self.steps if closed_after is None else -closed_after
        self.acc, self.steps, self.fresh = acc, base + steps, False

    def compute(self) -> dict[str, float]:
        """The reduced metrics of the window (waits for the last dispatch), then start over."""
        return self.detach()()

    def detach(self) -> Any:
        """Start a new window now; returns a function reading the old one's reduced metrics
        (the read waits only for the dispatches of the old window)."""
        acc = self.acc
        self.fresh, self.steps = True, 0
        for x in acc.values():
            x.copy_to_host_async()
        return lambda: self._reduce(jax.device_get(acc))

    def reduce(self, host: dict[str, Any]) -> dict[str, float]:
        """The logged values of one window read to the host (a dict of scalars)."""
        return self._reduce(host)

    def _reduce(self, host: dict[str, Any]) -> dict[str, float]:
        count = float(host[COUNT])
        out: dict[str, float] = {}
        for name, value in host.items():
            if name == COUNT:
                continue
            reduce = self.meta.get(name, MetricMeta()).reduce
            v = float(value)
            out[name] = v / count if reduce == "mean" else v
        return out

    def state_dict(self) -> dict[str, Any]:
        """The unlogged window as exact float32 values (waits for the device): a resumed run
        continues the same sums, so its next log equals the uninterrupted run's."""
        host = self._empty if self.fresh else jax.device_get(self.acc)
        return {"accumulated": {k: float(v) for k, v in host.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fresh:  # `acc` holds a window already read
            self.acc, self.fresh = self._fresh({}), False
        if "accumulated" in state:
            self.acc, self.steps = self._fresh(state["accumulated"]), int(state["steps"])
            return
        # the per-step format of earlier checkpoints: fold its steps in, in order
        values = {k: float(v) for k, v in jax.device_get(self.acc).items()}
        for step in state.get("steps", []):
            for name, v in step.items():
                reduce = self.meta.get(name, MetricMeta()).reduce
                old = values.get(name, 0.0)
                if reduce in ("mean", "sum"):
                    values[name] = float(np.float32(old) + np.float32(v))
                elif math.isnan(v) or math.isnan(old):
                    values[name] = math.nan
                else:
                    values[name] = (max if reduce == "max" else min)(old, v)
            values[COUNT] = values.get(COUNT, 0.0) + 1.0
            self.steps += 1
        self.acc = self._fresh(values)
