"""Fused dispatch (steps_per_dispatch) and data on the device: bitwise equal to one step per
dispatch, same logged metrics, same hooks, few compiled sizes, clear errors."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from meshfit.engine.run.dispatch import AUTO_MAX, DispatchPlanner, dispatch_sizes
from meshfit.engine.run.inflight import InFlight
from meshfit.strategies import available_strategies
from tests.models import MLP, classification_data, quiet

STRATEGIES = ["single", "dp"] + (["fsdp"] if "fsdp" in available_strategies() else [])


class Record(Callback):
    """Every log (step, metrics) and every step's hook (step, batch_idx, loss)."""

    fusion_safe = True

    def __init__(self):
        self.logs, self.steps = [], []

    def on_log(self, engine, metrics):
        self.logs.append((engine.global_step, dict(metrics)))

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.steps.append((engine.global_step, batch_idx, outputs["loss"]))


class Watch(Record):
    """A Record that declares it never steers the run: dispatches may then span log windows."""

    observes_only = True


def fit(spd, strategy="single", data_on_device="auto", n=320, record=Record, **kwargs):
    x, y = classification_data(n=n)
    record = record()
    kwargs = {"max_epochs": 2, "log_every_n_steps": 4, **kwargs}
    callbacks, val = [record, *kwargs.pop("callbacks", [])], kwargs.pop("val", None)
    engine = Engine(
        strategy=strategy,
        batch_size=32,
        steps_per_dispatch=spd,
        data_on_device=data_on_device,
        callbacks=callbacks,
        **quiet(**kwargs),
    )
    module = MLP(nnx.Rngs(0))
    engine.fit(module, (x, y), val_data=val)
    params = [np.asarray(p) for p in jax.tree.leaves(nnx.state(module, nnx.Param))]
    steps = [(g, b, float(v)) for g, b, v in record.steps]
    return engine, params, record.logs, steps


def assert_same(a, b):
    _, pa, la, sa = a
    _, pb, lb, sb = b
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert repr(la) == repr(lb) and repr(sa) == repr(sb)  # repr: nan equals nan


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_equals_one_step_per_dispatch_bitwise(strategy):
    one = fit(1, strategy, data_on_device=False)
    auto = fit("auto", strategy)  # data on the device, K up to 4 (the log cadence)
    assert auto[0].run.device_data is not None and one[0].run.device_data is None
    assert auto[0].run.planner.k_max == 4 and one[0].run.fused.programs == [1]
    assert_same(one, auto)
    assert [g for g, _ in auto[2]] == [4, 8, 12, 16, 20]  # no epoch-end read: nothing needs it


@pytest.mark.parametrize("strategy", ["single", "dp"])
def test_dispatches_spanning_log_windows_log_the_same_values_bitwise(strategy):
    """Logs every 3 steps, 10 steps an epoch: each dispatch runs a whole epoch, closing its
    windows on the device (one crosses the epoch's end); the host logs each at its step."""
    one = fit(1, strategy, data_on_device=False, log_every_n_steps=3)
    for on_device in (True, False):
        span = fit("auto", strategy, on_device, log_every_n_steps=3, record=Watch)
        sizes = [10] if on_device else [1, 8]  # host batches: only the compiled sizes
        assert span[0].run.spans_logs and span[0].run.fused.sizes == sizes
        assert_same(one, span)
        assert [g for g, _ in span[2]] == [3, 6, 9, 12, 15, 18, 20]


class Timeline(Watch):
    """A Watch that also records each epoch boundary with the counters and metrics it saw,
    and whether the state had already moved on (the next dispatch was queued)."""

    def __init__(self):
        super().__init__()
        self.events, self.ahead = [], []

    def on_train_epoch_start(self, engine):
        self.events.append(("start", engine.current_epoch, engine.batch_idx, engine.global_step))

    def on_train_epoch_end(self, engine):  # reads the metrics: the epoch's partial window
        at = (engine.current_epoch, engine.batch_idx, engine.global_step)
        self.events.append(("end", *at, dict(engine.callback_metrics)))
        self.ahead.append(engine.dispatch_end_step > engine.global_step)

    def on_log(self, engine, metrics):
        super().on_log(engine, metrics)
        self.events.append(("log", engine.current_epoch, engine.global_step, dict(metrics)))


class SteeringTimeline(Timeline):
    """The same records from a callback that does not declare observes_only."""

    observes_only = False


def test_epoch_ends_wait_for_the_next_dispatch_with_the_same_hooks_and_counters():
    """With observers only, an epoch's end runs once the next epoch's first dispatch is
    queued (the device does not idle at the boundary): the same hooks, in the same order, with
    the same counters and metrics as when it runs at once."""
    kw = {"max_epochs": 3, "log_every_n_steps": 3}
    (e1, *r1), (e2, *r2) = (fit("auto", record=r, **kw) for r in (Timeline, SteeringTimeline))
    assert_same((e1, *r1), (e2, *r2))
    t1, t2 = (next(cb for cb in e.callbacks if isinstance(cb, Timeline)) for e in (e1, e2))
    assert repr(t1.events) == repr(t2.events)
    assert [ev[0] for ev in t1.events if ev[0] != "log"] == ["start", "end"] * 3
    assert t1.ahead == [True, True, False]  # the last epoch's end has no next dispatch
    assert t2.ahead == [False, False, False]


class Logs(Callback):
    """Every log; observes only, and no batch hook (the host replays nothing per step)."""

    observes_only = True

    def __init__(self):
        self.logs, self.steps = [], []

    def on_log(self, engine, metrics):
        self.logs.append((engine.global_step, dict(metrics)))


def test_auto_fuses_past_auto_max_when_the_steps_are_fast_bitwise():
    """400 steps an epoch: "auto" starts at AUTO_MAX steps a dispatch, times them, then runs
    each later epoch as one dispatch; parameters and logs equal 8 steps per dispatch."""
    kw = {"n": 32 * 400, "max_epochs": 3, "log_every_n_steps": 50, "record": Logs}
    auto, eight = fit("auto", **kw), fit(8, **kw)
    assert_same(auto, eight)
    run = auto[0].run
    assert run.planner.k_max == 400 and run.fused.programs == [400]
    assert AUTO_MAX in run.fused.sizes and max(run.fused.sizes) == 400


def test_the_planner_goes_past_auto_max_only_as_far_as_the_timed_steps_allow():
    config = types.SimpleNamespace(log_every_n_steps=50, max_steps=None)
    engine = types.SimpleNamespace(config=config, num_training_batches=10_000, global_step=0)
    planner = DispatchPlanner("auto", engine, [], any_size=True, spans_logs=True)
    assert planner.k_max == 4096
    assert planner.next_k(engine, 10_000) == AUTO_MAX  # not timed yet
    assert planner.next_k(engine, 10_000, step_seconds=1e-6) == 4096
    assert planner.next_k(engine, 1000, step_seconds=1e-6) == 1000  # the epoch's end
    assert planner.next_k(engine, 10_000, step_seconds=1e-3) == 250  # 0.25 s of steps
    assert planner.next_k(engine, 10_000, step_seconds=1.0) == AUTO_MAX  # never below it
    fixed = DispatchPlanner("auto", engine, [], any_size=True, spans_logs=False)
    assert fixed.next_k(engine, 10_000, step_seconds=1e-6) == 50  # the log cadence bounds it


def test_in_flight_times_a_dispatch_only_after_two_waits_on_a_busy_device():
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 400, lambda i, x: jnp.tanh(x @ x), x))
    x = jnp.ones((96, 96)) * 0.01
    queue = InFlight(0, timed=True)
    for _ in range(3):
        queue.add(slow(x), 1)  # the first wait starts the clock, the second one reads it
    assert queue.step_seconds is not None and queue.step_seconds > 0
    ready = [slow(x) for _ in range(3)]
    jax.block_until_ready(ready)
    queue = InFlight(0, timed=True)
    for out in ready:  # done before the waits: nothing to time
        queue.add(out, 1)
    assert queue.step_seconds is None


def test_host_path_stacks_the_batches_of_a_dispatch_bitwise():
    host = fit(3, data_on_device=False, max_steps=17, max_epochs=None)
    device = fit(3, data_on_device=True, max_steps=17, max_epochs=None)
    assert_same(host, device)
    assert host[0].global_step == 17
    assert_same(host, fit(1, data_on_device=False, max_steps=17, max_epochs=None))


def test_only_a_few_sizes_compile_over_a_multi_epoch_fit():
    compiles, per_epoch = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
    )

    class Epochs(Callback):
        epoch_end_reads_metrics = False

        def on_train_epoch_end(self, engine):
            per_epoch.append(len(compiles))

    for on_device in (True, False):
        compiles.clear(), per_epoch.clear()
        engine, *_ = fit(
            "auto",
            data_on_device=on_device,
            max_epochs=5,
            log_every_n_steps=8,
            callbacks=[Epochs()],
        )
        fused = engine.run.fused
        if on_device:  # one program takes the number of steps: 8 and the remainders 2, 6, 4
            assert fused.programs == [8] and fused.sizes == [2, 4, 6, 8]
        else:  # 10 steps an epoch, logs every 8: the remainders 2, 6, 4 run one step at a time
            assert fused.programs == dispatch_sizes(8)[::-1] == [1, 8]
        assert all(fn._cache_size() <= 1 for fn in fused.jitted.values())  # one compile each
        assert per_epoch[1] == per_epoch[-1]  # nothing compiles after the second epoch
    assert dispatch_sizes(50) == [50, 8, 1]


def test_validation_and_checkpoint_cadences_hit_the_same_steps(tmp_path):
    class Validations(Callback):
        def __init__(self):
            self.at = []

        def on_validation_end(self, engine):
            self.at.append(engine.global_step)

    x, y = classification_data(n=64, seed=1)
    runs = []
    for spd in (1, "auto"):
        v = Validations()
        ckpt = ModelCheckpoint(dirpath=tmp_path / str(spd), every_n_steps=3, save_top_k=10)
        out = fit(spd, val_every_n_steps=5, callbacks=[v, ckpt], val=(x, y), max_steps=13)
        runs.append((out, v.at, sorted(p.name for p in (tmp_path / str(spd)).iterdir())))
    (one, v1, c1), (auto, v2, c2) = runs
    assert_same(one, auto)
    assert v1 == v2 == [5, 10] and c1 == c2 and len(c1) >= 4


def test_a_callback_not_declared_fusion_safe_forces_one_step_and_is_named():
    class PerStep(Callback):
        def on_train_batch_end(self, engine, outputs, batch, batch_idx): ...

    engine, *_ = fit("auto", callbacks=[PerStep()], enable_model_summary=True)
    assert engine.run.planner.k_max == 1 and engine.run.fused.programs == [1]
    summary = next(cb for cb in engine.callbacks if type(cb).__name__ == "ModelSummary")
    assert "PerStep" in summary.text and "1 step per dispatch" in summary.text


def test_nan_guard_names_the_exact_step_inside_a_dispatch():
    x, y = classification_data(n=320)
    x = x.copy()
    x[7 * 32 + 3, 0] = np.nan  # row 7*32+3 of the unshuffled data ...
    engine = Engine(strategy="single", max_epochs=1, batch_size=32, log_every_n_steps=10, **quiet())
    order = np.random.default_rng([0, 0]).permutation(320)  # epoch 0's order, seed 0
    bad_step = int(np.argmax(order == 7 * 32 + 3)) // 32  # ... lands in this step's batch
    with pytest.raises(FloatingPointError, match=rf"global step {bad_step}: loss = nan"):
        engine.fit(MLP(nnx.Rngs(0)), (x, y))
    assert engine.run.planner.k_max > 1 and int(engine.state.step) == bad_step


def test_resume_mid_epoch_inside_a_fused_run_is_bitwise(tmp_path):
    ref = fit("auto", max_steps=14, max_epochs=None, log_every_n_steps=5)
    ckpt = lambda: ModelCheckpoint(dirpath=tmp_path, every_n_steps=7, save_top_k=10)  # noqa: E731
    fit("auto", max_steps=7, max_epochs=None, log_every_n_steps=5, callbacks=[ckpt()])
    x, y = classification_data(n=320)
    record = Record()
    engine = Engine(
        strategy="single",
        max_steps=14,
        batch_size=32,
        log_every_n_steps=5,
        callbacks=[record, ckpt()],
        **quiet(),
    )
    module = MLP(nnx.Rngs(0))
    engine.fit(module, (x, y), ckpt_path="last")
    params = [np.asarray(p) for p in jax.tree.leaves(nnx.state(module, nnx.Param))]
    assert all(np.array_equal(a, b) for a, b in zip(params, ref[1], strict=True))
    assert record.logs == [g for g in ref[2] if g[0] > 7]  # the step-10 window spans the resume


def test_bad_arguments_fail_before_anything_compiles():
    with pytest.raises(ValueError, match="steps_per_dispatch=0"):
        Engine(max_steps=1, steps_per_dispatch=0)
    with pytest.raises(ValueError, match="data_on_device='yes'"):
        Engine(max_steps=1, data_on_device="yes")
    x, y = classification_data(n=64)
    engine = Engine(max_steps=1, data_on_device=True, batch_size=32, **quiet())
    with pytest.raises(ValueError, match="cannot keep train_data on the device"):
        engine.fit(MLP(nnx.Rngs(0)), [(x[:32], y[:32])])


def test_accumulation_and_clipping_run_per_optimizer_step_inside_a_dispatch():
    from meshfit.callbacks import GradientAccumulation

    runs = [
        fit(
            spd,
            "dp",
            callbacks=[GradientAccumulation(2)],
            gradient_clip_val=0.1,
            max_epochs=2,
            n=288,  # 9 micro-batches an epoch: 5 steps, the last one short
        )
        for spd in (1, "auto")
    ]
    assert runs[1][0].run.device_data is None  # accumulation feeds stacked host windows
    assert runs[1][0].run.fused.programs != [1]
    assert_same(*runs)


def test_warn_mode_skips_only_the_bad_step_inside_a_dispatch():
    x, y = classification_data(n=320)
    x = x.copy()
    x[[5, 200], 0] = np.nan
    runs = []
    for spd in (1, "auto"):
        engine = Engine(
            strategy="single",
            max_epochs=1,
            batch_size=32,
            nan_guard="warn",
            steps_per_dispatch=spd,
            **quiet(),
        )
        module = MLP(nnx.Rngs(0))
        with pytest.warns(RuntimeWarning, match=r"2 training step\(s\)"):
            engine.fit(module, (x, y))
        assert int(engine.state.step) == 8  # 10 steps, 2 skipped
        runs.append([np.asarray(p) for p in jax.tree.leaves(nnx.state(module, nnx.Param))])
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
