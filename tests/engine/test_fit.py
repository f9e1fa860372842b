"""The fit loop: parity across strategies, one trace, metrics, write-back, validation weighting."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import meshfit.engine.run.inflight
from meshfit import Engine, TrainModule
from tests.models import MLP, classification_data, quiet


def params_of(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_dp_on_8_devices_matches_single_device():
    data = classification_data()
    results = {}
    for strategy in ("single", "dp"):
        module = MLP(nnx.Rngs(0))
        Engine(strategy=strategy, max_steps=20, batch_size=64, **quiet()).fit(module, data)
        results[strategy] = params_of(module)
    assert max_abs_diff(results["single"], results["dp"]) <= 1e-5
    # and training actually moved the parameters
    assert max_abs_diff(results["single"], params_of(MLP(nnx.Rngs(0)))) > 1e-3


def test_one_program_and_two_traces_of_the_step_over_a_multi_epoch_fit():
    traces = []

    class Counting(MLP):
        def training_step(self, batch):
            traces.append(1)
            return super().training_step(batch)

    x, y = classification_data(n=256)
    engine = Engine(strategy="dp", max_epochs=3, batch_size=64, log_every_n_steps=2, **quiet())
    engine.fit(Counting(nnx.Rngs(0)), (x, y), val_data=(x[:100], y[:100]))
    assert engine.global_step == 12 and engine.current_epoch == 3
    # auto: the dispatches span log windows (closed on the device), so each runs to the epoch's
    # end (4 steps); the data is on the device: one program (of the largest K) runs every K.
    # Traced twice: for the metric shapes at start-up, and inside that one program.
    assert engine.run.fused.programs == [engine.run.planner.k_max]
    assert engine.run.fused.sizes == [4]
    assert len(traces) == 2


def test_callback_metrics_are_floats_and_module_is_updated_in_place():
    x, y = classification_data(n=1024)
    module = MLP(nnx.Rngs(0), lr=3e-2)
    before = params_of(module)
    engine = Engine(strategy="dp", max_epochs=4, batch_size=64, **quiet())
    engine.fit(module, (x[:896], y[:896]), val_data=(x[896:], y[896:]))
    metrics = engine.callback_metrics
    assert {"loss", "acc", "val_acc"} <= set(metrics)
    assert all(type(v) is float for v in metrics.values())
    assert metrics["val_acc"] > 0.8 and metrics["loss"] < 1.0
    assert max_abs_diff(before, params_of(module)) > 1e-3
    # the state's leaves are the live sharded arrays; the module now holds them
    assert engine.state.params["l1"]["kernel"][...].sharding.mesh.shape == {"data": 8}
    # validate() agrees with the last validation pass of fit
    assert engine.validate(module, (x[896:], y[896:]))["val_acc"] == pytest.approx(
        metrics["val_acc"]
    )


def test_validation_is_weighted_by_batch_size_with_a_partial_last_batch():
    class Echo(TrainModule):
        def __init__(self):
            self.w = nnx.Param(np.zeros((1,), np.float32))

        def training_step(self, batch):
            return (self.w[...] ** 2).sum()

        def validation_step(self, batch):
            (x,) = batch
            self.log("mean_x", x)  # an array over the batch, reduced in-step
            self.log("sum_x", x, reduce="sum")
            self.log("max_x", x, reduce="max")
            self.log("min_x", x, reduce="min")

        def configure_optimizers(self):
            return optax.sgd(0.1)

    x = np.arange(100, dtype=np.float32)  # 100 rows, batch 32 -> 32, 32, 32, 4 (last replicated)
    engine = Engine(strategy="dp", max_steps=1, batch_size=32, **quiet())
    out = engine.validate(Echo(), (x,))
    assert out["mean_x"] == pytest.approx(x.mean())
    assert out["sum_x"] == pytest.approx(x.sum())
    assert out["max_x"] == 99.0 and out["min_x"] == 0.0


def test_training_order_depends_only_on_seed_and_epoch():
    seen = {}

    class Recorder(TrainModule):
        def __init__(self):
            self.w = nnx.Param(np.zeros((), np.float32))

        def training_step(self, batch):
            (i,) = batch
            self.log("first", i[0].astype(np.float32), reduce="max")
            return self.w[...] ** 2

        def configure_optimizers(self):
            return optax.sgd(0.1)

    idx = np.arange(64, dtype=np.int32)
    for strategy, bs in (("single", 8), ("dp", 16)):
        order = []

        class Rec(Recorder):
            pass

        engine = Engine(
            strategy=strategy, max_epochs=1, batch_size=bs, log_every_n_steps=1, seed=3, **quiet()
        )
        from meshfit.engine.data import ArrayLoader

        loader = ArrayLoader((idx,), bs, shuffle=True, drop_last=True, seed=3, name="x")
        order = np.concatenate([b.local[0] for b in loader.epoch(0)])
        seen[strategy] = order
        engine.fit(Rec(), (idx,))
    assert np.array_equal(seen["single"], seen["dp"])
    assert not np.array_equal(seen["single"], idx)


def test_dropout_and_batchnorm_state_is_carried_forward():
    class Net(TrainModule):
        def __init__(self, rngs):
            self.l = nnx.Linear(16, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def training_step(self, batch):
            x, y = batch
            logits = self.l(self.drop(self.bn(x)))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def validation_step(self, batch):
            x, y = batch
            self.log("val_acc", (self.l(self.drop(self.bn(x))).argmax(-1) == y).mean())

        def configure_optimizers(self):
            return optax.adam(1e-2)

    x, y = classification_data()
    x = x * 3 + 1
    module = Net(nnx.Rngs(0))
    engine = Engine(strategy="dp", max_steps=10, batch_size=64, **quiet())
    engine.fit(module, (x, y), val_data=(x, y))
    mean = np.asarray(module.bn.mean[...])
    assert np.all(np.abs(mean) > 0.05)  # running statistics moved towards the data mean (1.0)
    assert int(module.drop.rngs.count[...]) == 10


def test_iterable_of_batches_matches_the_same_batches_from_arrays():
    from meshfit.engine.data import ArrayLoader

    x, y = classification_data(n=256)
    loader = ArrayLoader((x, y), 64, shuffle=True, drop_last=True, seed=0, name="x")
    batches = [b.local for b in loader.epoch(0)] + [b.local for b in loader.epoch(1)]
    a, b = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    Engine(strategy="dp", max_steps=8, batch_size=64, **quiet()).fit(a, (x, y))
    engine = Engine(strategy="dp", max_steps=8, batch_size=64, **quiet())
    engine.fit(b, batches[:4])  # a list is re-iterable: epoch 2 sees the same 4 batches
    assert engine.current_epoch == 2
    # epoch 0 identical; epoch 1 of the arrays is a new permutation, so compare after 4 steps
    a4, b4 = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(0))
    Engine(strategy="dp", max_steps=4, batch_size=64, **quiet()).fit(a4, (x, y))
    Engine(strategy="dp", max_steps=4, batch_size=64, **quiet()).fit(b4, iter(batches[:4]))
    assert max_abs_diff(params_of(a4), params_of(b4)) <= 1e-6


def test_iterables_in_multi_process_runs_must_be_marked_per_process():
    from meshfit.engine.data import make_loader

    with pytest.raises(TypeError, match=r"2 processes.*meshfit.PerProcess\(batches\)"):
        make_loader(iter([]), 8, train=True, seed=0, process_count=2, name="train_data")


@pytest.mark.parametrize(
    ("strategy", "max_in_flight", "budget", "expected"),
    [
        ("single", None, None, 10),
        ("single", None, 4 * 64 * (16 * 4 + 4), 4),  # 4 batches: 64 rows x (16 f32 + 1 i32)
        ("dp", None, None, 2),
        ("single", 3, None, 3),
    ],
)
def test_steps_in_flight_default_by_placement(
    strategy, max_in_flight, budget, expected, monkeypatch
):
    """One CPU device: steps queue up to the next metric read (a wait there costs compute), as
    far as the batches' memory budget allows; several devices: 2 (the XLA:CPU collective stall,
    device memory); an explicit bound wins."""
    if budget is not None:
        monkeypatch.setattr(meshfit.engine.run.inflight, "QUEUED_BATCH_BYTES", budget)
    engine = Engine(
        strategy,
        max_steps=20,
        batch_size=64,
        log_every_n_steps=10,
        max_in_flight=max_in_flight,
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0)), classification_data(n=256))
    assert engine.run.in_flight_limit == expected
    assert np.isfinite(engine.callback_metrics["loss"])
