"""configure_optimizers' dict form (a named schedule that LearningRateMonitor() logs) and
optimizers whose update takes the loss (`optax.contrib.reduce_on_plateau`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import Callback, LearningRateMonitor
from meshfit.engine.step.optimizer import accepts_value
from tests.models import quiet

SCHEDULE = optax.linear_schedule(0.5, 0.05, transition_steps=12)
GRAD = np.array([1.0, -2.0], np.float32)
DATA = (np.ones((96, 1), np.float32),)


class Linear(TrainModule):
    """loss = w . GRAD (constant gradient), or, with `floor`, a loss value that falls to `floor`
    and then stays there while the gradient stays GRAD (a plateau)."""

    def __init__(self, optimizers, floor=None):
        self.w = nnx.Param(jnp.zeros((2,), jnp.float32))
        self.optimizers, self.floor = optimizers, floor

    def training_step(self, batch):
        (x,) = batch
        return loss_value(self.w[...], self.floor) + 0.0 * x.mean()

    def configure_optimizers(self):
        return self.optimizers()


def loss_value(w, floor):
    slope = (w * GRAD).sum()
    if floor is None:
        return slope
    # value max(10 + w.g, floor), gradient always GRAD
    return (
        jnp.maximum(10.0 + jax.lax.stop_gradient(slope), floor)
        + slope
        - jax.lax.stop_gradient(slope)
    )


class Weights(Callback):
    def __init__(self):
        self.w = [np.zeros(2, np.float32)]

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.w.append(np.asarray(engine.state.params["w"][...]))


def test_dict_form_names_the_schedule_and_lr_monitor_logs_it_without_arguments():
    monitor, weights = LearningRateMonitor(), Weights()
    module = Linear(lambda: {"optimizer": optax.sgd(SCHEDULE), "lr_schedule": SCHEDULE})
    engine = Engine(
        max_steps=12, batch_size=8, log_every_n_steps=3, callbacks=[monitor, weights], **quiet()
    )
    engine.fit(module, DATA)
    assert engine.lr_schedule is SCHEDULE
    assert [s for s, _ in monitor.history] == [3, 6, 9, 12]
    for step, logged in monitor.history:
        assert logged["lr"] == pytest.approx(float(SCHEDULE(step - 1)), rel=1e-6)
        applied = (weights.w[step - 1] - weights.w[step]) / GRAD  # the rate really used
        np.testing.assert_allclose(applied, logged["lr"], rtol=1e-5)


def test_a_plain_optimizer_has_no_schedule_and_bad_dicts_fail_clearly():
    engine = Engine(max_steps=1, batch_size=8, **quiet())
    engine.fit(Linear(lambda: optax.sgd(0.1)), DATA)
    assert engine.lr_schedule is None
    cases = [
        ({"optimizer": optax.sgd(0.1), "lr_scheduler": SCHEDULE}, ValueError, "lr_scheduler"),
        ({"optimizer": optax.sgd(0.1), "lr_schedule": 0.1}, TypeError, "must be a function"),
        ({"lr_schedule": SCHEDULE}, TypeError, "got NoneType"),
    ]
    for out, error, match in cases:
        with pytest.raises(error, match=match):
            Engine(max_steps=1, batch_size=8, **quiet()).fit(Linear(lambda o=out: o), DATA)


def plateau_optimizer():
    return optax.chain(
        optax.sgd(0.1),
        optax.contrib.reduce_on_plateau(factor=0.5, patience=2, cooldown=0, accumulation_size=1),
    )


def test_reduce_on_plateau_gets_the_loss_and_lowers_the_rate_after_a_plateau():
    steps, weights = 12, Weights()
    engine = Engine(max_steps=steps, batch_size=8, callbacks=[weights], **quiet())
    engine.fit(Linear(plateau_optimizer, floor=8.0), DATA)

    # The same optimizer driven by hand with the loss value, as optax documents.
    tx, w = plateau_optimizer(), jnp.zeros((2,), jnp.float32)
    state, scales = tx.init(w), []
    for _ in range(steps):
        value, grad = jax.value_and_grad(loss_value)(w, 8.0)
        updates, state = tx.update(grad, state, w, value=value)
        w = optax.apply_updates(w, updates)
        scales.append(float(state[1].scale))
    np.testing.assert_allclose(weights.w[-1], np.asarray(w), atol=1e-6)

    moved = [
        float(np.abs(b - a).sum() / np.abs(GRAD).sum()) for a, b in zip(weights.w, weights.w[1:])
    ]
    print("rate per update:", [round(m, 4) for m in moved], "scale:", scales)
    assert moved[:4] == pytest.approx([0.1] * 4)  # the loss falls 10 -> 8: full rate
    assert moved[-1] == pytest.approx(0.1 * scales[-2]) and scales[-1] < 0.5  # lowered twice+
    assert float(engine.state.opt_state[1].scale) == pytest.approx(scales[-1])


def test_which_updates_take_the_loss():
    assert accepts_value(plateau_optimizer())
    assert accepts_value(optax.contrib.reduce_on_plateau())
    plain = optax.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))
    assert not accepts_value(plain)
    engine = Engine(max_steps=2, batch_size=8, **quiet())
    engine.fit(Linear(lambda: plain), DATA)  # an update without `value=` still works
    assert int(engine.state.step) == 2
