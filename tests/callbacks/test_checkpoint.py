"""ModelCheckpoint: contents, cadence, best-k by a fresh monitored metric, errors, weights export."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meshfit
import meshfit.engine.checkpoint.format
from meshfit import CheckpointError, Engine
from meshfit.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ProgressBar,
    StepTransform,
)
from tests.models import MLP, classification_data, quiet


def params_of(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


class Counter(StepTransform):
    """An in-step transform with state: counts updates, and scales gradients by 1 + 1/count."""

    def init(self, params):
        return {"count": jnp.zeros((), jnp.int32)}

    def process_grads(self, grads, state, loss=None):
        count = state["count"] + 1
        scale = 1.0 + 1.0 / count.astype(jnp.float32)
        return jax.tree.map(lambda g: g * scale, grads), {"count": count}, None


class DropoutMLP(MLP):
    """Uses its RNG stream every step (a typed PRNG key in the non-parameter state)."""

    def __init__(self, rngs):
        super().__init__(rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


class ValLoss(MLP):
    def validation_step(self, batch):
        x, y = batch
        loss = optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()
        self.log("val_loss", loss)


class Record(Callback):
    """Remembers (step, value) of a metric after each validation."""

    def __init__(self, name):
        self.name, self.seen = name, []

    def on_validation_end(self, engine):
        self.seen.append((engine.global_step, engine.callback_metrics[self.name]))


DATA = classification_data(n=320)  # 5 batches of 64 per epoch
VAL = (DATA[0][:128], DATA[1][:128])


def test_in_process_resume_restores_rng_transform_state_callbacks_and_position(tmp_path):
    def engine(max_steps, *callbacks):
        return Engine(
            strategy="single", max_steps=max_steps, batch_size=64, log_every_n_steps=4,
            callbacks=[Counter(), *callbacks], **quiet(),
        )  # fmt: skip

    straight = DropoutMLP(nnx.Rngs(0))
    ref = engine(13)
    ref.fit(straight, DATA, val_data=VAL)

    first = engine(8, ModelCheckpoint(tmp_path, every_n_steps=3), EarlyStopping("val_acc", 5))
    first.fit(DropoutMLP(nnx.Rngs(0)), DATA, val_data=VAL)
    assert sorted(os.listdir(tmp_path)) == ["8"]  # saved at 3, 6 and at the end; newest kept
    es = EarlyStopping("val_acc", 5, mode="max")
    resumed_module = DropoutMLP(nnx.Rngs(7))
    bar = io.StringIO()
    resumed = engine(13, ModelCheckpoint(tmp_path, every_n_steps=3), es, ProgressBar(file=bar))
    resumed.fit(resumed_module, DATA, val_data=VAL, ckpt_path="last")

    assert same(params_of(resumed_module), params_of(straight))
    key = lambda e: jax.random.key_data(e.state.rest["drop"]["rngs"]["key"][...])  # noqa: E731
    assert np.array_equal(key(resumed), key(ref))
    assert int(resumed.state.extra["Counter"]["count"]) == 13  # transform state continued
    assert (resumed.current_epoch, resumed.batch_idx) == (ref.current_epoch, ref.batch_idx)
    assert resumed.callback_metrics["loss"] == ref.callback_metrics["loss"]
    assert es.best is not None  # the saved EarlyStopping state (best, wait) came back
    assert " 8/13 " in bar.getvalue() and " 0/13 " not in bar.getvalue()  # bar starts at 8


def test_last_without_checkpoint_warns_and_starts_from_scratch(tmp_path):
    module = MLP(nnx.Rngs(0))
    engine = Engine("single", max_steps=2, batch_size=64, default_root_dir=tmp_path, **quiet())
    with pytest.warns(UserWarning, match="no checkpoint .* starting from scratch"):
        engine.fit(module, DATA, ckpt_path="last")
    assert engine.global_step == 2
    # default directory: <default_root_dir>/checkpoints; fit end saves the last state
    mc = ModelCheckpoint()
    Engine(
        "single", max_steps=3, batch_size=64, default_root_dir=tmp_path, callbacks=[mc], **quiet()
    ).fit(MLP(nnx.Rngs(0)), DATA)
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    # no file in a checkpoint is a pickle: loading never runs code
    for root, _, files in os.walk(tmp_path / "checkpoints"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert f.read(1) != b"\x80", name


def test_monitor_keeps_best_k_by_fresh_validation_metric_plus_last(tmp_path):
    record = Record("val_loss")
    mc = ModelCheckpoint(tmp_path, monitor="val_loss", save_top_k=2)
    engine = Engine(
        strategy="dp", max_steps=12, batch_size=64, val_every_n_steps=2,
        callbacks=[record, mc], **quiet(),
    )  # fmt: skip
    engine.fit(ValLoss(nnx.Rngs(0), lr=0.3), DATA, val_data=VAL)
    assert [s for s, _ in record.seen] == [2, 4, 6, 8, 10, 12]
    ranked = sorted(record.seen, key=lambda sv: sv[1])
    kept = {str(s) for s, _ in ranked[:2]} | {"12"}
    assert set(os.listdir(tmp_path)) == kept
    assert (mc.best_model_step, mc.best_model_score) == ranked[0]
    # "best" resumes from the best step, whose saved score is the value read after validation
    mc2 = ModelCheckpoint(tmp_path, monitor="val_loss")
    engine2 = Engine(strategy="dp", max_steps=1, batch_size=64, callbacks=[mc2], **quiet())
    engine2.fit(ValLoss(nnx.Rngs(0)), DATA, val_data=VAL, ckpt_path="best")
    assert engine2.callback_metrics["val_loss"] == ranked[0][1]


def test_monitor_that_is_never_logged_fails_at_fit_start(tmp_path):
    def fit(mc, val=True, **kw):
        engine = Engine("single", max_steps=4, batch_size=64, callbacks=[mc], **quiet(**kw))
        with pytest.raises(ValueError) as err:
            engine.fit(ValLoss(nnx.Rngs(0)), DATA, val_data=VAL if val else None)
        assert engine.global_step == 0
        return str(err.value)

    msg = fit(ModelCheckpoint(tmp_path, monitor="nope"))
    assert "'nope'" in msg and "['acc', 'loss']" in msg and "['val_loss']" in msg
    assert "no val_data" in fit(ModelCheckpoint(tmp_path, monitor="val_loss"), val=False)
    msg = fit(ModelCheckpoint(tmp_path, monitor="loss", every_n_steps=3), log_every_n_steps=2)
    assert "multiple of log_every_n_steps" in msg
    msg = fit(ModelCheckpoint(tmp_path, monitor="val_loss", every_n_steps=3))
    assert "only at epoch ends" in msg


def test_errors_missing_path_mismatched_params_other_optimizer_other_format(tmp_path, monkeypatch):
    Engine(
        "single", max_steps=2, batch_size=64, callbacks=[ModelCheckpoint(tmp_path)], **quiet()
    ).fit(MLP(nnx.Rngs(0)), DATA)

    def resume(module, path):
        engine = Engine("single", max_steps=4, batch_size=64, **quiet())
        with pytest.raises(CheckpointError) as err:
            engine.fit(module, DATA, ckpt_path=path)
        assert engine.global_step == 0
        return str(err.value)

    assert "does not exist" in resume(MLP(nnx.Rngs(0)), tmp_path / "nope")
    msg = resume(MLP(nnx.Rngs(0), hidden=48), tmp_path / "2")
    assert "l1/kernel: checkpoint float32[16, 32], this run float32[16, 48]" in msg
    msg = resume(MLP(nnx.Rngs(0), opt="sgd"), tmp_path)
    assert "different optimizer" in msg and "ScaleByAdamState" in msg
    monkeypatch.setattr(
        meshfit.engine.checkpoint.format,
        "FORMAT_VERSION",
        meshfit.engine.checkpoint.format.FORMAT_VERSION + 1,
    )
    assert "written by an older meshfit" in resume(MLP(nnx.Rngs(0)), tmp_path)


def test_save_and_load_weights_for_inference(tmp_path):
    module = MLP(nnx.Rngs(0))
    Engine(
        "single",
        max_steps=3,
        batch_size=64,
        callbacks=[ModelCheckpoint(tmp_path / "ck")],
        **quiet(),
    ).fit(module, DATA)
    meshfit.save_weights(module, tmp_path / "weights")
    plain = meshfit.load_weights(MLP(nnx.Rngs(5)), tmp_path / "weights")
    assert same(params_of(plain), params_of(module))
    x = DATA[0][:8]
    assert np.array_equal(np.asarray(plain(x)), np.asarray(module(x)))
    # straight from a training checkpoint too (the newest step of the directory)
    assert same(
        params_of(meshfit.load_weights(MLP(nnx.Rngs(5)), tmp_path / "ck")), params_of(module)
    )
    with pytest.raises(CheckpointError, match="l2/bias"):
        meshfit.load_weights(MLP(nnx.Rngs(5), classes=3), tmp_path / "weights")
