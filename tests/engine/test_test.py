"""Engine.test: equals validate, row-weighted, logged, checkpoints; sanity validation in fit."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, load_weights
from meshfit.callbacks import Callback, ModelCheckpoint
from tests.models import MLP, classification_data, quiet

X, Y = classification_data(n=1001)
TRAIN = classification_data(n=256, seed=2)


class Evaluated(MLP):
    def metrics(self, batch, prefix):
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_acc", (logits.argmax(-1) == y).mean())
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def validation_step(self, batch):
        return self.metrics(batch, "val")

    def test_step(self, batch):
        return self.metrics(batch, "test")


def full_set_loss(module, x, y):
    logits = module(jnp.asarray(x))
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


class Record(Callback):
    def __init__(self):
        self.events = []

    def on_log(self, engine, metrics):
        self.events.append(("log", dict(metrics)))

    def on_test_start(self, engine):
        self.events.append("test_start")

    def on_test_end(self, engine):
        self.events.append("test_end")


def test_test_equals_validate_and_weights_rows():
    module = Evaluated(nnx.Rngs(0))
    record = Record()
    engine = Engine(strategy="dp", batch_size=32, max_steps=1, callbacks=[record], **quiet())
    tested = engine.test(module, (X, Y))
    validated = engine.validate(module, (X, Y))
    assert set(tested) == {"test_acc", "test_loss"}
    np.testing.assert_allclose(tested["test_loss"], validated["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(tested["test_acc"], validated["val_acc"], rtol=1e-6)
    # the last batch of 9 rows counts 9 rows: the mean over all 1001 rows
    np.testing.assert_allclose(tested["test_loss"], full_set_loss(module, X, Y), rtol=1e-5)
    assert engine.callback_metrics["test_loss"] == tested["test_loss"]
    assert record.events[:3] == ["test_start", ("log", tested), "test_end"]


def test_test_without_test_step_fails_before_compiling():
    engine = Engine(strategy="dp", max_steps=1, **quiet())
    with pytest.raises(TypeError, match="MLP has no test_step"):
        engine.test(MLP(nnx.Rngs(0)), (X, Y))


def test_ckpt_path_best_loads_the_best_checkpoint(tmp_path):
    module = Evaluated(nnx.Rngs(0))
    xv, yv = X[:301], Y[:301]  # the validation set, also the test set
    ckpt = ModelCheckpoint(tmp_path / "ckpt", every_n_steps=2, monitor="val_loss", save_top_k=1)
    engine = Engine(
        strategy="dp",
        batch_size=32,
        max_steps=8,
        val_every_n_steps=2,
        log_every_n_steps=2,
        callbacks=[ckpt],
        **quiet(),
    )
    module.lr = 0.3  # a large learning rate: the last step is unlikely to be the best
    engine.fit(module, TRAIN, val_data=(xv, yv))
    best_path = ckpt.best_model_path
    assert best_path is not None
    current = engine.test(module, (xv, yv))
    best = engine.test(module, (xv, yv), ckpt_path="best")
    reference = Evaluated(nnx.Rngs(5))
    load_weights(reference, best_path)
    np.testing.assert_allclose(best["test_loss"], full_set_loss(reference, xv, yv), rtol=1e-5)
    np.testing.assert_allclose(best["test_loss"], ckpt.best_model_score, rtol=1e-5)
    if ckpt.best_model_step != engine.global_step:
        assert best["test_loss"] != current["test_loss"]
    # the module now holds the best weights
    np.testing.assert_allclose(full_set_loss(module, xv, yv), best["test_loss"], rtol=1e-5)


class Broken(MLP):
    def validation_step(self, batch):
        raise RuntimeError("broken validation_step")


def test_a_raising_validation_step_stops_fit_before_the_first_step():
    engine = Engine(strategy="dp", batch_size=32, max_epochs=1, **quiet())
    with pytest.raises(RuntimeError, match="broken validation_step") as info:
        engine.fit(Broken(nnx.Rngs(0)), TRAIN, val_data=(X, Y))
    assert engine.global_step == 0
    assert any("before the first training step" in note for note in info.value.__notes__)


def test_without_sanity_steps_the_failure_comes_after_an_epoch():
    engine = Engine(strategy="dp", batch_size=32, max_epochs=1, num_sanity_val_steps=0, **quiet())
    with pytest.raises(RuntimeError, match="broken validation_step"):
        engine.fit(Broken(nnx.Rngs(0)), TRAIN, val_data=(X, Y))
    assert engine.global_step == 8


def test_sanity_validation_is_not_logged():
    record = Record()
    engine = Engine(strategy="dp", batch_size=32, max_steps=2, callbacks=[record], **quiet())
    engine.fit(Evaluated(nnx.Rngs(0)), TRAIN, val_data=(X, Y))
    logs = [e[1] for e in record.events if e[0] == "log"]
    assert [sorted(m) for m in logs] == [["acc", "loss"], ["val_acc", "val_loss"]]


def test_num_sanity_val_steps_is_checked():
    with pytest.raises(ValueError, match="num_sanity_val_steps must be a non-negative integer"):
        Engine(max_steps=1, num_sanity_val_steps=-1)
