"""EMA of the weights: a NumPy reference, strategies, resume, evaluation, weights files."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import meshfit
from meshfit import Engine
from meshfit.callbacks import EMA, Callback, GradientAccumulation, ModelCheckpoint
from meshfit.strategies import FSDP, Pipeline
from tests.models import MLP, classification_data, quiet
from tests.strategies.test_pipeline import DATA, StackNet


class LossMLP(MLP):
    """MLP whose validation and test log a loss that moves with every weight."""

    def validation_step(self, batch):
        x, y = batch
        self.log("val_loss", optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean())

    def test_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()


class RecordParams(Callback):
    """The parameters, step and EMA after every step (run with steps_per_dispatch=1)."""

    def __init__(self):
        self.params, self.steps, self.ema = [], [], []

    def on_fit_start(self, engine):
        self.params.append(flat(engine.state.params))

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.params.append(flat(engine.state.params))
        self.steps.append(int(engine.state.step))
        self.ema.append(flat(ema_of(engine)))


def flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def ema_of(engine):
    return engine.state.extra["EMA"]["params"]


def fit(callbacks, steps=20, strategy="single", data=None, val_data=None, **kwargs):
    x, y = data or classification_data(n=320)
    module = LossMLP(nnx.Rngs(0), opt=kwargs.pop("opt", "adam"))
    engine = Engine(
        strategy=strategy,
        max_steps=steps,
        batch_size=32,
        log_every_n_steps=5,
        callbacks=callbacks,
        **quiet(**kwargs),
    )
    engine.fit(module, (x, y), val_data=val_data)
    return engine, module


def reference(params, steps, decay, start_step=0):
    """The EMA from the per-step parameters, in float64 (a step whose update was skipped,
    i.e. whose step counter did not move, skips the average)."""
    ema, count, prev = [p.astype(np.float64) for p in params[0]], 0, 0
    for p, step in zip(params[1:], steps, strict=True):
        if step == prev:
            continue
        prev = step
        ema = [q.astype(np.float64) if count < start_step else decay * e + (1 - decay) * q
               for e, q in zip(ema, p, strict=True)]  # fmt: skip
        count += 1
    return ema


@pytest.mark.parametrize("start_step", [0, 6])
def test_ema_matches_a_numpy_reference_over_20_steps(start_step):
    record = RecordParams()
    engine, _ = fit([record, EMA(decay=0.8, start_step=start_step)], steps_per_dispatch=1)
    ref = reference(record.params, record.steps, 0.8, start_step)
    got = flat(ema_of(engine))
    assert len(record.steps) == 20 and int(engine.state.extra["EMA"]["count"]) == 20
    for a, b, p in zip(got, ref, record.params[-1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        assert np.abs(a - p).max() > 1e-3  # really an average, not the parameters
    # every step agrees, including the first `start_step` ones, where the EMA is the params
    for i, ema in enumerate(record.ema):
        step_ref = reference(record.params[: i + 2], record.steps[: i + 1], 0.8, start_step)
        for a, b in zip(ema, step_ref, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        if i < start_step:
            assert all(np.array_equal(a, b) for a, b in zip(ema, record.params[i + 1]))


@pytest.mark.filterwarnings("ignore:.*non-finite loss:RuntimeWarning")
def test_skipped_updates_skip_the_average():
    x, y = classification_data(n=320)
    x = x.copy()
    x[::97] = np.nan  # some batches have a NaN row: their loss is NaN, the guard skips them
    record = RecordParams()
    engine, _ = fit([record, EMA(decay=0.8)], data=(x, y), nan_guard="warn", steps_per_dispatch=1)
    applied = int(engine.state.step)
    assert 10 <= applied < 20  # some updates were skipped, most applied
    assert int(engine.state.extra["EMA"]["count"]) == applied
    for a, b in zip(flat(ema_of(engine)), reference(record.params, record.steps, 0.8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", ["dp", "fsdp"])
def test_equal_under_single_dp_fsdp_and_laid_out_like_the_params(strategy):
    single, _ = fit([EMA(decay=0.8)], opt="sgd")
    chosen = FSDP(min_shard_bytes=256) if strategy == "fsdp" else strategy
    other, _ = fit([EMA(decay=0.8)], strategy=chosen, opt="sgd")
    for a, b in zip(flat(ema_of(other)), flat(ema_of(single)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    shardings = lambda t: [x.sharding.spec for x in jax.tree.leaves(t)]  # noqa: E731
    assert shardings(ema_of(other)) == shardings(other.state.params)
    if strategy == "fsdp":
        assert any(any(s) for s in shardings(ema_of(other)))  # really sharded


def test_fused_dispatch_equals_one_step_per_dispatch_bitwise():
    one, _ = fit([EMA(decay=0.8, start_step=3)], steps_per_dispatch=1)
    fused, _ = fit([EMA(decay=0.8, start_step=3)])
    assert "1 step" not in (fused.dispatch_summary or "")
    for a, b in zip(flat(ema_of(fused)), flat(ema_of(one)), strict=True):
        assert np.array_equal(a, b)


def test_resume_through_a_checkpoint_is_bitwise(tmp_path):
    straight, _ = fit([EMA(decay=0.8)])
    ckpt = lambda: ModelCheckpoint(dirpath=tmp_path, every_n_steps=10)  # noqa: E731
    fit([EMA(decay=0.8), ckpt()], steps=10)
    x, y = classification_data(n=320)
    engine = Engine(
        strategy="single", max_steps=20, batch_size=32, log_every_n_steps=5,
        callbacks=[EMA(decay=0.8), ckpt()], **quiet(),
    )  # fmt: skip
    engine.fit(LossMLP(nnx.Rngs(1)), (x, y), ckpt_path="last")
    for a, b in zip(flat(engine.state.extra), flat(straight.state.extra), strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(flat(engine.state.params), flat(straight.state.params), strict=True):
        assert np.array_equal(a, b)


def with_weights(params):
    module = LossMLP(nnx.Rngs(5))
    nnx.update(module, jax.device_get(params))
    return module


def test_use_for_eval_validates_tests_and_predicts_with_the_average(tmp_path):
    x, y = classification_data(n=320, seed=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", every_n_steps=20)
    engine, module = fit([EMA(decay=0.8), ckpt], val_data=(x, y), val_every_n_steps=20)
    averaged, trained = with_weights(ema_of(engine)), with_weights(engine.state.params)
    plain = Engine(strategy="single", max_steps=1, **quiet())
    ema_val = plain.validate(averaged, (x, y))["val_loss"]
    trained_val = plain.validate(trained, (x, y))["val_loss"]
    assert abs(ema_val - trained_val) > 1e-3  # the test can tell them apart
    assert engine.callback_metrics["val_loss"] == pytest.approx(ema_val, abs=1e-6)
    assert ckpt.best_model_score == pytest.approx(ema_val, abs=1e-6)  # the monitored metric
    assert engine.validate(module, (x, y))["val_loss"] == pytest.approx(ema_val, abs=1e-6)
    ema_test = plain.test(averaged, (x, y))["test_loss"]
    assert engine.test(module, (x, y))["test_loss"] == pytest.approx(ema_test, abs=1e-6)
    np.testing.assert_allclose(engine.predict(module, x), averaged(x), atol=1e-6)
    # from the checkpoint too: its average is what evaluation uses
    best = engine.test(LossMLP(nnx.Rngs(3)), (x, y), ckpt_path="best")["test_loss"]
    assert best == pytest.approx(ema_test, abs=1e-6)


def test_use_for_eval_false_evaluates_the_trained_weights():
    x, y = classification_data(n=320, seed=1)
    engine, module = fit([EMA(decay=0.8, use_for_eval=False)], val_data=(x, y))
    trained = Engine(strategy="single", max_steps=1, **quiet()).validate(
        with_weights(engine.state.params), (x, y)
    )["val_loss"]
    assert engine.callback_metrics["val_loss"] == pytest.approx(trained, abs=1e-6)
    np.testing.assert_allclose(engine.predict(module, x), module(x), atol=1e-6)


def test_after_fit_the_module_holds_the_trained_weights_unless_swap_at_end():
    engine, module = fit([EMA(decay=0.8)])
    held = flat(nnx.state(module, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(held, flat(engine.state.params), strict=True))
    assert not np.array_equal(held[0], flat(ema_of(engine))[0])
    engine, module = fit([EMA(decay=0.8, swap_at_end=True)])
    held = flat(nnx.state(module, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(held, flat(ema_of(engine)), strict=True))


def test_save_and_load_weights_with_ema_round_trip(tmp_path):
    engine, module = fit([EMA(decay=0.8), ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    ema = flat(ema_of(engine))
    meshfit.save_weights(engine, tmp_path / "ema", ema=True)
    meshfit.save_weights(engine, tmp_path / "trained")
    for path, kwargs in [("ema", {}), ("ema", {"ema": True}), ("ckpt", {"ema": True})]:
        loaded = meshfit.load_weights(LossMLP(nnx.Rngs(7)), tmp_path / path, **kwargs)
        got = flat(nnx.state(loaded, nnx.Param))
        assert all(np.array_equal(a, b) for a, b in zip(got, ema, strict=True)), (path, kwargs)
    trained = flat(nnx.state(meshfit.load_weights(LossMLP(nnx.Rngs(7)), tmp_path / "trained")))
    assert all(
        np.array_equal(a, b) for a, b in zip(trained, flat(engine.state.params), strict=True)
    )
    with pytest.raises(meshfit.CheckpointError, match="holds trained weights, not a moving"):
        meshfit.load_weights(LossMLP(nnx.Rngs(7)), tmp_path / "trained", ema=True)
    with pytest.raises(meshfit.CheckpointError, match="engine that fitted it"):
        meshfit.save_weights(module, tmp_path / "x", ema=True)


def test_a_run_without_ema_gives_clear_errors(tmp_path):
    engine, _ = fit([ModelCheckpoint(dirpath=tmp_path / "ckpt")], steps=2)
    with pytest.raises(meshfit.CheckpointError, match="this run has no EMA"):
        meshfit.save_weights(engine, tmp_path / "w", ema=True)
    with pytest.raises(meshfit.CheckpointError, match="holds no EMA"):
        meshfit.load_weights(LossMLP(nnx.Rngs(0)), tmp_path / "ckpt", ema=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 0.0}, "strictly between 0 and 1"),
        ({"decay": 1.0}, "strictly between 0 and 1"),
        ({"decay": -0.5}, "strictly between 0 and 1"),
        ({"decay": "0.9"}, "strictly between 0 and 1"),
        ({"start_step": -1}, "start_step must be an integer >= 0"),
        ({"start_step": 1.5}, "start_step must be an integer >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_two_ema_callbacks_fail_before_compiling():
    engine = Engine(max_steps=1, callbacks=[EMA(), EMA(decay=0.9)], **quiet())
    with pytest.raises(ValueError, match="2 EMA callbacks"):
        engine.fit(MLP(nnx.Rngs(0)), classification_data(n=64))
    assert engine.compiled_step is None


def test_pipeline_keeps_the_average_on_the_stages_like_the_stacked_params():
    engine = Engine(
        strategy=Pipeline(stages=4, microbatches=2), devices=4, max_steps=3, batch_size=32,
        callbacks=[EMA(decay=0.5)], **quiet(),
    )  # fmt: skip
    engine.fit(StackNet(nnx.Rngs(0)), DATA)
    specs = lambda t: [x.sharding.spec for x in jax.tree.leaves(t)]  # noqa: E731
    assert specs(ema_of(engine)) == specs(engine.state.params)
    assert any("stage" in str(s) for s in specs(ema_of(engine)))


def test_gradient_accumulation_averages_once_per_optimizer_update():
    record = RecordParams()
    engine, _ = fit([record, GradientAccumulation(steps=2), EMA(decay=0.8)], steps=6,
                    steps_per_dispatch=1)  # fmt: skip
    assert int(engine.state.extra["EMA"]["count"]) == int(engine.state.step) == 6
    for a, b in zip(flat(ema_of(engine)), reference(record.params, record.steps, 0.8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
