"""Bad input is refused before anything compiles, with what was given and how to fix it."""

import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, TrainModule
from tests.models import MLP, classification_data, quiet


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown strategy 'fdsp'.*Valid names: .*dp.*single"):
        Engine(strategy="fdsp", max_steps=1)


def test_no_stopping_point():
    with pytest.raises(ValueError, match="both max_epochs and max_steps are unset"):
        Engine()


def test_more_devices_than_exist():
    with pytest.raises(ValueError, match=r"devices=64.*8 cpu device"):
        Engine(devices=64, max_steps=1)


def test_batch_not_divisible_by_data_parallel_size():
    engine = Engine(strategy="dp", batch_size=100, max_steps=1, **quiet())
    msg = r"Global batch size 100 is not divisible by the 8 data-parallel devices of strategy 'dp'.*96 or 104"
    with pytest.raises(ValueError, match=msg):
        engine.fit(MLP(nnx.Rngs(0)), classification_data())
    assert engine.compiled_step is None


def test_arrays_of_different_lengths():
    x, y = classification_data()
    engine = Engine(max_steps=1, batch_size=64, **quiet())
    with pytest.raises(ValueError, match=r"same number of rows.*\(512, 16\).*\(500,\)"):
        engine.fit(MLP(nnx.Rngs(0)), (x, y[:500]))
    assert engine.compiled_step is None


def test_dataset_smaller_than_one_batch():
    x, y = classification_data(n=40)
    engine = Engine(max_steps=1, batch_size=64, **quiet())
    with pytest.raises(ValueError, match="40 rows, fewer than one batch of 64"):
        engine.fit(MLP(nnx.Rngs(0)), (x, y))


def test_missing_training_step():
    class NoStep(TrainModule):
        def __init__(self):
            self.w = nnx.Param(np.zeros(3, np.float32))

        def configure_optimizers(self):
            return optax.sgd(0.1)

    with pytest.raises(TypeError, match="has no training_step"):
        Engine(max_steps=1, **quiet()).fit(NoStep(), classification_data())


def test_non_scalar_loss():
    class VectorLoss(MLP):
        def training_step(self, batch):
            x, y = batch
            return optax.softmax_cross_entropy_with_integer_labels(self(x), y)  # forgot .mean()

    engine = Engine(max_steps=1, batch_size=64, **quiet())
    with pytest.raises(
        ValueError, match=r"scalar floating loss, got an array of shape \(64,\).*loss.mean\(\)"
    ):
        engine.fit(VectorLoss(nnx.Rngs(0)), classification_data())
    assert engine.compiled_step is None


def test_optimizer_must_be_optax():
    class BadOpt(MLP):
        def configure_optimizers(self):
            return "adam"

    with pytest.raises(TypeError, match=r"configure_optimizers\(\) must return an optax.*got str"):
        Engine(max_steps=1, **quiet()).fit(BadOpt(nnx.Rngs(0)), classification_data())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"precision": "fp8"}, "precision='fp8' is not supported"),
        ({"gradient_clip_algorithm": "l2"}, "gradient_clip_algorithm='l2'"),
        ({"max_epochs": -1}, "max_epochs must be a positive integer"),
    ],
)
def test_bad_engine_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(**{"max_steps": 1, **kwargs})


def test_log_outside_a_step():
    with pytest.raises(RuntimeError, match="outside a step"):
        MLP(nnx.Rngs(0)).log("x", 1.0)
