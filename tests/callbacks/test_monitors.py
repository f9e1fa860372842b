"""LearningRateMonitor logs the rate each update applied; DeviceStatsMonitor logs memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import Callback, DeviceStatsMonitor, LearningRateMonitor, TensorBoardLogger
from meshfit.callbacks import device_stats as device_stats_module
from meshfit.callbacks.lr_monitor import injected_learning_rates
from tests.callbacks.test_loggers import read_scalars
from tests.models import MLP, classification_data, quiet

SCHEDULE = optax.linear_schedule(0.5, 0.05, transition_steps=12)
GRAD = np.array([1.0, -2.0], np.float32)  # the constant gradient of the loss below


class ConstantGradient(TrainModule):
    """loss = w . GRAD: every SGD update moves w by exactly -lr * GRAD."""

    def __init__(self, inject: bool):
        self.w = nnx.Param(jnp.zeros((2,), jnp.float32))
        self.inject = inject

    def training_step(self, batch):
        (x,) = batch
        return (self.w[...] * GRAD).sum() + 0.0 * x.mean()

    def configure_optimizers(self):
        if self.inject:
            return optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE)
        return optax.sgd(SCHEDULE)


class Recorder(Callback):
    """Logged metrics by step, and the parameter after every step (a device read per step)."""

    def __init__(self, read_w=False):
        self.logs, self.w, self.read_w = {}, [np.zeros(2, np.float32)], read_w

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if self.read_w:
            self.w.append(np.asarray(engine.state.params["w"][...]))

    def on_log(self, engine, metrics):
        self.logs.setdefault(engine.global_step, {}).update(metrics)


@pytest.mark.parametrize("inject", [True, False], ids=["inject_hyperparams", "schedule_fn"])
def test_logged_lr_is_the_schedule_and_the_rate_each_update_applied(inject):
    monitor = LearningRateMonitor(schedule=None if inject else SCHEDULE)
    recorder = Recorder(read_w=True)
    engine = Engine(
        strategy="dp",
        max_steps=12,
        batch_size=8,
        log_every_n_steps=3,
        gradient_clip_val=1e6 if inject else None,  # nests the optax state in a chain
        callbacks=[monitor, recorder, TensorBoardLogger()],
        enable_progress_bar=False,
    )
    engine.fit(ConstantGradient(inject), (np.ones((96, 1), np.float32),))

    logged = {step: m["lr"] for step, m in recorder.logs.items() if "lr" in m}
    assert sorted(logged) == [3, 6, 9, 12]
    for step, lr in logged.items():
        assert lr == pytest.approx(float(SCHEDULE(step - 1)), rel=1e-6)
        # the rate the step-th update really applied: w moved by -lr * GRAD
        applied = (recorder.w[step - 1] - recorder.w[step]) / GRAD
        np.testing.assert_allclose(applied, lr, rtol=1e-5)
    assert engine.callback_metrics["lr"] == logged[12]
    assert [s for s, _ in monitor.history] == [3, 6, 9, 12]
    # and the loggers got it, at the same steps
    tb = read_scalars(engine.callbacks[2].log_dir)["lr"]
    assert [(s, pytest.approx(v)) for s, v in tb] == sorted(logged.items())


def test_lr_monitor_without_a_visible_rate_says_how_to_fix_it():
    engine = Engine(max_steps=2, batch_size=8, callbacks=[LearningRateMonitor()], **quiet())
    with pytest.raises(ValueError, match="inject_hyperparams"):
        engine.fit(ConstantGradient(inject=False), (np.ones((16, 1), np.float32),))
    with pytest.raises(TypeError, match="schedule"):
        LearningRateMonitor(schedule=0.1)


def test_several_injected_rates_are_found_in_tree_order():
    tx = optax.multi_transform(
        {
            "a": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            "b": optax.inject_hyperparams(optax.adam)(learning_rate=0.02),
        },
        {"x": "a", "y": "b"},
    )
    state = tx.init({"x": jnp.zeros(2), "y": jnp.zeros(3)})
    assert [float(r) for r in injected_learning_rates(state)] == pytest.approx([0.1, 0.02])
    assert injected_learning_rates(optax.adam(1e-3).init({"x": jnp.zeros(2)})) == []


def test_device_stats_monitor_logs_each_device_at_the_log_cadence(monkeypatch):
    calls = {"n": 0}

    def fake_stats(device):
        calls["n"] += 1
        return {
            "bytes_in_use": 1000 * device.id + calls["n"],
            "peak_bytes_in_use": 5000 + 1000 * device.id,
            "bytes_limit": 10**9,
        }

    monkeypatch.setattr(device_stats_module, "memory_stats", fake_stats)
    monitor, recorder = DeviceStatsMonitor(), Recorder()
    engine = Engine(
        strategy="dp",
        max_steps=6,
        batch_size=32,
        log_every_n_steps=2,
        callbacks=[monitor, recorder],
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0)), classification_data(n=256))

    ids = [d.id for d in jax.devices()]
    logged_steps = [s for s, m in recorder.logs.items() if "memory/max_bytes_in_use" in m]
    assert logged_steps == [2, 4, 6]
    for step in logged_steps:
        m = recorder.logs[step]
        in_use = [m[f"memory/device_{i}/bytes_in_use"] for i in ids]
        # fresh readings at each log: one call per device, in device order
        calls_seen = [int(v) - 1000 * i for v, i in zip(in_use, ids, strict=True)]
        assert calls_seen == list(range(calls_seen[0], calls_seen[0] + len(ids)))
        assert m["memory/max_bytes_in_use"] == max(in_use)
        assert all(m[f"memory/device_{i}/peak_bytes_in_use"] == 5000 + 1000 * i for i in ids)
    first, last = recorder.logs[2], recorder.logs[6]
    assert last["memory/device_0/bytes_in_use"] > first["memory/device_0/bytes_in_use"]
    assert monitor.last == {k: v for k, v in last.items() if k.startswith("memory/")}


def test_device_stats_monitor_on_cpu_warns_and_logs_nothing():
    recorder = Recorder()
    engine = Engine(
        strategy="dp",
        max_steps=4,
        batch_size=32,
        log_every_n_steps=2,
        callbacks=[DeviceStatsMonitor(), recorder],
        **quiet(),
    )
    with pytest.warns(UserWarning, match="memory_stats"):
        engine.fit(MLP(nnx.Rngs(0)), classification_data(n=256))
    assert recorder.logs and not any(
        k.startswith("memory/") for m in recorder.logs.values() for k in m
    )
