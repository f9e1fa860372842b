"""Engine(nan_guard=...): a non-finite loss stops training (or warns) and keeps the last good state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import DynamicLossScaling, GradientAccumulation, NanGuard
from tests.models import MLP, classification_data, quiet


def params_of(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def batches(n, bad=(), bs=64, marker=np.nan):
    x, y = classification_data(n=n * bs)
    x = x.copy()
    for i in bad:
        x[i * bs, 0] = marker
    return [(x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]) for i in range(n)]


def test_a_nan_loss_stops_training_with_the_step_and_keeps_the_last_good_state():
    data = batches(8, bad={3})
    module = MLP(nnx.Rngs(0))
    engine = Engine(strategy="dp", max_epochs=1, batch_size=64, log_every_n_steps=5, **quiet())
    with pytest.raises(FloatingPointError, match=r"global step 3: loss = nan") as info:
        engine.fit(module, data)
    assert "nan_guard='warn'" in str(info.value)
    # detected at the log cadence (no per-step sync), not at the bad step itself ...
    assert engine.global_step == 5
    # ... yet the state is the one after the last good step: updates 3 and 4 were skipped
    assert int(engine.state.step) == 3
    good = MLP(nnx.Rngs(0))
    Engine(strategy="dp", max_epochs=1, batch_size=64, **quiet()).fit(good, data[:3])
    for a, b in zip(jax.tree.leaves(params_of(module)), jax.tree.leaves(params_of(good))):
        np.testing.assert_array_equal(a, b)


def test_warn_mode_skips_bad_steps_and_trains_on():
    module = MLP(nnx.Rngs(0))
    engine = Engine(strategy="single", max_epochs=1, batch_size=64, nan_guard="warn", **quiet())
    with pytest.warns(RuntimeWarning, match=r"2 training step\(s\).*first at global step 1"):
        engine.fit(module, batches(6, bad={1, 4}))
    assert engine.global_step == 6 and int(engine.state.step) == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params_of(module)))


def test_without_the_guard_a_nan_batch_destroys_the_parameters():
    module = MLP(nnx.Rngs(0))
    Engine(strategy="single", max_epochs=1, batch_size=64, nan_guard=False, **quiet()).fit(
        module, batches(3, bad={1})
    )
    assert np.isnan(np.asarray(module.l1.kernel[...])).any()


def test_check_grads_catches_a_non_finite_gradient_with_a_finite_loss():
    class SqrtAtZero(MLP):
        def training_step(self, batch):
            x, _ = batch
            loss = super().training_step(batch)
            flag = x[0, 0] == 7.0  # the marked batch: d/dw sqrt(0 * w) = nan, the value is 0
            nan_grad = lambda b: jnp.sqrt(0.0 * b).sum()  # noqa: E731
            return loss + jax.lax.cond(flag, nan_grad, lambda b: 0.0, self.l2.bias[...])

    guard = NanGuard("error", check_grads=True)
    engine = Engine(strategy="single", max_epochs=1, batch_size=64, callbacks=[guard], **quiet())
    with pytest.raises(FloatingPointError, match=r"global step 2: a gradient is non-finite"):
        engine.fit(SqrtAtZero(nnx.Rngs(0)), batches(4, bad={2}, marker=7.0))
    assert int(engine.state.step) == 2


def test_a_nan_micro_batch_poisons_its_accumulation_window():
    engine = Engine(
        strategy="dp",
        max_epochs=1,
        batch_size=16,
        callbacks=[GradientAccumulation(4)],
        **quiet(),
    )
    with pytest.raises(FloatingPointError, match="global step 1"):
        engine.fit(MLP(nnx.Rngs(0)), batches(12, bad={5}, bs=16))  # micro-batch 5: window 1
    assert int(engine.state.step) == 1


def test_the_guard_is_added_by_default_and_defers_to_loss_scaling():
    guards = lambda e: [cb for cb in e.callbacks if isinstance(cb, NanGuard)]  # noqa: E731
    assert [g.mode for g in guards(Engine(max_steps=1, **quiet()))] == ["error"]
    assert [g.mode for g in guards(Engine(max_steps=1, nan_guard="warn", **quiet()))] == ["warn"]
    assert guards(Engine(max_steps=1, nan_guard=False, **quiet())) == []
    scaled = Engine(max_steps=1, callbacks=[DynamicLossScaling()], **quiet())
    assert guards(scaled) == []
    with pytest.raises(ValueError, match="nan_guard='raise'"):
        Engine(max_steps=1, nan_guard="raise", **quiet())


def test_a_finite_run_is_bitwise_the_same_with_and_without_the_guard():
    results = []
    for guard in ("error", False):
        module = MLP(nnx.Rngs(0), opt="adam")
        Engine(strategy="single", max_steps=4, batch_size=64, nan_guard=guard, **quiet()).fit(
            module, classification_data(n=256)
        )
        results.append(params_of(module))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(a, b)
