"""Debug and run control: fast_dev_run, limit_*_batches, overfit_batches, max_time,
check_val_every_n_epoch; each counted (optimizer steps, validation passes and batches, files)."""

import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, CSVLogger, ModelCheckpoint, Timer
from meshfit.engine.data import epoch_order
from tests.models import MLP, classification_data

B = 32  # batch size: 512 rows -> 16 training batches per epoch
EVAL_ROWS: list[int] = []  # rows of every executed validation batch (sanity check included)


class CountingMLP(MLP):
    """Records each executed validation batch's rows from inside the compiled eval step."""

    def validation_step(self, batch):
        super().validation_step(batch)
        jax.debug.callback(lambda n: EVAL_ROWS.append(int(n)), jnp.int32(batch[0].shape[0]))


class Recorder(Callback):
    """The global step at each validation pass and epoch end; the steps each fit ran."""

    fusion_safe = True

    def __init__(self):
        self.validations, self.epoch_ends, self.steps = [], [], []

    def on_validation_start(self, engine):
        self.validations.append(engine.global_step)

    def on_train_epoch_end(self, engine):
        self.epoch_ends.append(engine.global_step)

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.steps.append(engine.global_step)


def fit(tmp_path=None, data=None, val=None, spd="auto", module=None, callbacks=(), **kwargs):
    """A quiet single-device fit; returns (engine, recorder, module, eval rows per batch)."""
    EVAL_ROWS.clear()
    x, y = classification_data(n=512) if data is None else data
    rec = Recorder()
    kwargs.setdefault("logger", False)
    root = str(tmp_path) if tmp_path else "./runs"
    engine = Engine(
        strategy="single", devices=1, batch_size=B, enable_progress_bar=False,
        enable_model_summary=False, steps_per_dispatch=spd, default_root_dir=root,
        callbacks=[rec, *callbacks], **kwargs,
    )  # fmt: skip
    module = module or CountingMLP(nnx.Rngs(0))
    engine.fit(module, (x, y), val_data=val)
    jax.effects_barrier()
    return engine, rec, module, list(EVAL_ROWS)


def params(module):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(module, nnx.Param))]


VAL = classification_data(n=100, seed=1)  # 4 validation batches: 32, 32, 32, 4 rows


@pytest.mark.parametrize("spd", ["auto", 1])
@pytest.mark.parametrize("n", [True, 3])
def test_fast_dev_run_runs_n_batches_writes_nothing_and_says_so(tmp_path, capsys, n, spd):
    ckpt, csv = ModelCheckpoint(every_n_steps=1), CSVLogger(str(tmp_path / "csv"))
    engine, rec, _, rows = fit(
        tmp_path, val=VAL, spd=spd, fast_dev_run=n, max_epochs=10, logger=True,
        num_sanity_val_steps=2, callbacks=[ckpt, csv],
    )  # fmt: skip
    n = 1 if n is True else n
    assert engine.global_step == n and int(engine.state.step) == n and rec.steps[-1] == n
    assert rec.validations == [n]  # once, at the end; no sanity check ran before step 0
    assert rows == [B] * n  # n validation batches, nothing else
    assert engine.callback_metrics["val_count"] == n * B
    assert ckpt not in engine.callbacks and csv not in engine.callbacks and not engine.loggers
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "csv")
    assert not os.path.exists(tmp_path / "tensorboard")  # the default logger is off too
    assert f"fast_dev_run={n if n > 1 else True}: {n} training and {n} validation" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("limit, per_epoch", [(5, 5), (0.25, 4), (100, 16), (1.0, 16)])
def test_limit_train_batches_ends_each_epoch_after_that_many_batches(limit, per_epoch):
    engine, rec, _, _ = fit(val=VAL, limit_train_batches=limit, max_epochs=3)
    assert engine.global_step == 3 * per_epoch and engine.current_epoch == 3
    assert rec.epoch_ends == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert rec.validations == rec.epoch_ends  # validation at each (shortened) epoch's end
    assert engine.num_training_batches == per_epoch


def test_limited_epochs_take_each_epochs_first_batches_reshuffled_same_under_auto_and_1():
    """Bitwise the same under steps_per_dispatch='auto' and 1, data on the device or not."""
    x, y = classification_data(n=512)
    runs = {
        spd: params(fit(limit_train_batches=5, max_epochs=3, spd=spd)[2]) for spd in ("auto", 1)
    }
    host = params(fit(limit_train_batches=5, max_epochs=3, data_on_device=False)[2])
    for a, b, c in zip(runs["auto"], runs[1], host):
        assert np.array_equal(a, b) and np.array_equal(a, c)  # data on the device or not
    # the same 15 steps by hand: the first 5 batches of each epoch's permutation, in order
    batches = []
    for epoch in range(3):
        order = epoch_order(512, 0, epoch, shuffle=True)
        batches += [
            (x[order[i * B : (i + 1) * B]], y[order[i * B : (i + 1) * B]]) for i in range(5)
        ]
    assert not np.array_equal(batches[0][0], batches[5][0])  # epoch 1 is reshuffled
    ref = CountingMLP(nnx.Rngs(0))
    Engine(
        strategy="single", devices=1, max_epochs=1, enable_progress_bar=False, logger=False,
        enable_model_summary=False,
    ).fit(ref, batches)  # fmt: skip
    for a, b in zip(runs["auto"], params(ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("limit, batches", [(2, [B, B]), (0.5, [B, B]), (10, [B, B, B, 4])])
def test_limit_val_batches_and_the_sanity_check_uses_the_smaller(limit, batches):
    engine, _, _, rows = fit(
        val=VAL, limit_val_batches=limit, max_epochs=2, limit_train_batches=3,
        num_sanity_val_steps=3,
    )  # fmt: skip
    sanity = batches[:3]
    assert rows == sanity + batches + batches  # sanity check, then one pass per epoch
    assert engine.callback_metrics["val_count"] == sum(batches)


@pytest.mark.parametrize("off", [0, 0.0])
def test_limit_val_batches_zero_turns_validation_off(off):
    engine, rec, _, rows = fit(val=VAL, limit_val_batches=off, max_epochs=2, limit_train_batches=2)
    assert rows == [] and rec.validations == [] and "val_acc" not in engine.callback_metrics
    assert engine.global_step == 4


@pytest.mark.parametrize("spd", ["auto", 1])
def test_check_val_every_n_epoch_validates_every_nth_epoch(spd):
    _, rec, _, _ = fit(
        val=VAL, spd=spd, check_val_every_n_epoch=2, max_epochs=5, limit_train_batches=3,
        num_sanity_val_steps=0,
    )  # fmt: skip
    assert rec.epoch_ends == [3, 6, 9, 12, 15]
    assert rec.validations == [6, 12]
    # None: only val_every_n_steps
    _, rec, _, _ = fit(
        val=VAL, spd=spd, check_val_every_n_epoch=None, val_every_n_steps=4, max_epochs=2,
        limit_train_batches=3,
    )  # fmt: skip
    assert rec.validations == [4]


@pytest.mark.parametrize("spd, on_device", [("auto", "auto"), (1, False)])
def test_overfit_batches_trains_and_validates_on_the_same_first_batches(spd, on_device):
    x, y = classification_data(n=512)
    engine, rec, module, rows = fit(
        val=VAL, spd=spd, overfit_batches=2, max_epochs=4, num_sanity_val_steps=0,
        data_on_device=on_device,
    )  # fmt: skip
    assert engine.data_on_device_active == (on_device == "auto")
    assert engine.global_step == 8 and rec.epoch_ends == [2, 4, 6, 8]
    assert rows == [B, B] * 4  # each pass: the 2 training batches, not the 4 of VAL
    # the same two unshuffled batches in every epoch: equal to a fit over them, by hand
    batches = [(x[:B], y[:B]), (x[B : 2 * B], y[B : 2 * B])]
    ref = CountingMLP(nnx.Rngs(0))
    Engine(
        strategy="single", devices=1, max_epochs=4, enable_progress_bar=False, logger=False,
        enable_model_summary=False,
    ).fit(ref, batches)  # fmt: skip
    for a, b in zip(params(module), params(ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # the last validation metric is computed on those training rows
    check = Engine(strategy="single", devices=1, batch_size=B, max_steps=1, logger=False)
    expected = check.validate(module, (x[: 2 * B], y[: 2 * B]))
    assert engine.callback_metrics["val_acc"] == pytest.approx(expected["val_acc"], abs=1e-7)
    assert engine.callback_metrics["val_count"] == 2 * B


def test_overfit_batches_fraction():
    engine, _, _, rows = fit(overfit_batches=0.125, max_epochs=2)  # 2 of 16 batches
    assert engine.global_step == 4 and rows == [B, B] + [B, B] * 2  # sanity check, 2 passes


class Slow(Callback):
    """A slow host step: sleeps after every optimizer step."""

    fusion_safe = True

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        time.sleep(0.01)


def test_max_time_forms():
    two_hours = datetime.timedelta(hours=2, seconds=5)
    for form in ("00:02:00:05", two_hours, {"hours": 2, "seconds": 5}):
        assert Timer(form).duration == two_hours
    assert Timer("1:00:00:00").duration == datetime.timedelta(days=1)


@pytest.mark.parametrize("spd, max_time", [("auto", {"seconds": 2}), (1, "00:00:00:02")])
def test_max_time_stops_at_a_step_boundary_with_a_checkpoint_of_that_step(tmp_path, spd, max_time):
    # compiles of the dispatch sizes would count as training time: warm JAX's cache first
    cache = str(tmp_path / "jax_cache")
    fit(tmp_path / "warm", spd=spd, max_steps=20, compilation_cache_dir=cache)
    ckpt = ModelCheckpoint(every_n_steps=100_000)  # no cadence save: only the stop's
    start = time.monotonic()
    engine, rec, _, _ = fit(
        tmp_path, spd=spd, max_time=max_time, max_steps=100_000, callbacks=[Slow(), ckpt],
        compilation_cache_dir=cache,
    )  # fmt: skip
    wall = time.monotonic() - start
    timer = next(cb for cb in engine.callbacks if isinstance(cb, Timer))
    step = engine.global_step
    print(
        f"max_time 2 s, steps_per_dispatch={spd!r}: stopped at step {step} after "
        f"{timer.stopped_after:.3f} s of training ({wall:.2f} s wall for the whole fit)"
    )
    assert 20 < step < 100_000 and timer.stopped_step == step == int(engine.state.step)
    assert rec.steps == list(range(1, step + 1))  # every step seen, none after the stop
    assert 2.0 <= timer.stopped_after < 2.5  # a dispatch stops near the limit, not K steps on
    assert wall < 2.0 + 15.0
    assert os.listdir(tmp_path / "checkpoints") == [str(step)]  # saved at exactly that step


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(limit_train_batches=-1), "limit_train_batches=-1: use None"),
        (dict(limit_train_batches=0), "an int >= 1"),
        (dict(limit_train_batches=1.5), r"a float in \(0.0, 1.0\]"),
        (dict(limit_val_batches=-0.5), r"a float in \[0.0, 1.0\]"),
        (dict(overfit_batches=-3), "overfit_batches=-3"),
        (dict(overfit_batches=2.0), "overfit_batches=2.0"),
        (dict(fast_dev_run=-1), "fast_dev_run=-1"),
        (dict(max_time="12 hours"), 'is not a duration: use "DD:HH:MM:SS"'),
        (dict(max_time={"hrs": 1}), "is not a duration"),
        (dict(max_time="00:00:00:00"), "use a positive duration"),
        (dict(check_val_every_n_epoch=0), "check_val_every_n_epoch=0"),
        (dict(check_val_every_n_epoch=None), "validation would never run"),
        (dict(check_val_every_n_epoch=2, val_every_n_steps=5), "Use one of them"),
    ],
)
def test_bad_settings_raise_clear_errors_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(max_steps=10, **kwargs)


def test_fractions_that_give_no_batch_or_need_a_length_raise_before_compiling():
    with pytest.raises(ValueError, match=r"limit_val_batches=0.1 of the 4 batches of val_data"):
        fit(val=VAL, limit_val_batches=0.1, max_steps=2)
    x, y = classification_data(n=128)

    class Batches:  # re-iterable, no length
        def __iter__(self):
            return iter([(x[i : i + B], y[i : i + B]) for i in range(0, 128, B)])

    engine = Engine(
        strategy="single", devices=1, max_steps=2, limit_train_batches=0.5, logger=False
    )
    with pytest.raises(ValueError, match=r"has no length .* Pass an int number of batches"):
        engine.fit(MLP(nnx.Rngs(0)), Batches())
    # an int limit works on it: 2 batches per epoch
    engine = Engine(
        strategy="single", devices=1, max_epochs=2, limit_train_batches=2, logger=False,
        enable_progress_bar=False,
    )  # fmt: skip
    engine.fit(MLP(nnx.Rngs(0)), Batches())
    assert engine.global_step == 4
