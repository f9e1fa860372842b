"""Host-side combination of per-step metric scalars, read only at the log cadence."""

from __future__ import annotations

import jax
import numpy as np

from meshfit.module import MetricMeta


class MetricWindow:
    """Holds the device scalars of the steps since the last read; `compute` reads them once.

    Adding is free (no device sync). Each metric is combined across steps with its own
    `reduce` (mean weighted by `weight`, e.g. the batch size; sum; max; min).
    """

    def __init__(self, meta: dict[str, MetricMeta]):
        self.meta = meta
        self._steps: list[dict[str, jax.Array]] = []
        self._weights: list[float] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, metrics: dict[str, jax.Array], weight: float = 1.0) -> None:
        self._steps.append(metrics)
        self._weights.append(float(weight))

    def compute(self) -> dict[str, float]:
        """Combine and clear the window (one device->host transfer for all of it)."""
        steps, weights = jax.device_get(self._steps), np.asarray(self._weights)
        self._steps, self._weights = [], []
        out: dict[str, float] = {}
        for name in dict.fromkeys(k for step in steps for k in step):
            present = [i for i, step in enumerate(steps) if name in step]
            values = np.asarray([steps[i][name] for i in present], dtype=np.float64)
            reduce = self.meta.get(name, MetricMeta()).reduce
            if reduce == "mean":
                w = weights[present]
                out[name] = float((values * w).sum() / w.sum())
            else:
                out[name] = float({"sum": np.sum, "max": np.max, "min": np.min}[reduce](values))
        return out
