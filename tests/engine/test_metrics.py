"""MetricWindow: reading finished steps early (`settle`) gives the same reduced values."""

import jax.numpy as jnp
import numpy as np
import pytest

from meshfit.engine.module import MetricMeta
from meshfit.engine.run.metrics import MetricWindow

META = {"loss": MetricMeta("mean"), "top": MetricMeta("max"), "n": MetricMeta("sum")}


def filled(settle_every: int | None) -> MetricWindow:
    window = MetricWindow(META)
    for i in range(7):
        step = {"loss": jnp.float32(i), "top": jnp.float32(-i)}
        if i % 2:
            step["n"] = jnp.int32(i)  # logged on some steps only
        window.add(step, weight=1.0 + i % 3)
        if settle_every and i % settle_every == 0:
            window.settle()
    return window


@pytest.mark.parametrize("settle_every", [None, 1, 3])
def test_settled_and_unsettled_windows_reduce_alike(settle_every):
    weights = [1.0 + i % 3 for i in range(7)]
    expected = {
        "loss": sum(i * w for i, w in enumerate(weights)) / sum(weights),
        "top": 0.0,
        "n": 1.0 + 3 + 5,
    }
    window = filled(settle_every)
    assert len(window) == 7
    assert window.compute() == pytest.approx(expected, rel=1e-12)
    assert len(window) == 0 and window.compute() == {}
    # the window starts over cleanly after a read
    window.add({"loss": jnp.float32(4.0)})
    window.settle()
    assert window.compute() == {"loss": 4.0}


def test_non_finite_values_propagate():
    window = MetricWindow(META)
    for value in (1.0, float("inf"), -float("inf"), float("nan")):
        window.add({"loss": jnp.float32(value), "top": jnp.float32(value)})
    assert all(np.isnan(v) for v in window.compute().values())
