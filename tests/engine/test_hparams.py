"""Module constructor arguments recorded as hyperparameters, without the user calling anything."""

import jax.numpy as jnp
from flax import nnx

from meshfit import Engine
from meshfit.engine.hparams import module_hparams
from tests.models import MLP, classification_data, quiet


class Wide(MLP):
    hparams_ignore = ("secret",)

    def __init__(self, rngs, seed=7, act=nnx.relu, dtype=jnp.bfloat16, secret="x", **kwargs):
        super().__init__(rngs, **kwargs)
        self.extra = nnx.Linear(2, 2, rngs=rngs)


def test_outermost_constructor_arguments_are_recorded_and_plain():
    module = Wide(nnx.Rngs(0), hidden=8, lr=0.5)
    assert module_hparams(module) == {
        "seed": 7,
        "act": "jax._src.nn.functions.relu",
        "dtype": "jax.numpy.bfloat16",
        "hidden": 8,
        "lr": 0.5,
    }  # no rngs (nnx.Rngs), no secret (hparams_ignore), MLP's own call not recorded over it
    assert not any("hparams" in name for name in vars(module))  # not stored on the module


def test_engine_hparams_merge_configuration_and_module_arguments():
    engine = Engine("single", max_steps=1, batch_size=16, seed=3, **quiet())
    engine.fit(Wide(nnx.Rngs(0), hidden=8), classification_data(n=32))
    hparams = engine.hparams
    assert hparams["batch_size"] == 16 and hparams["seed"] == 3
    assert hparams["module.seed"] == 7 and hparams["hidden"] == 8  # a taken name is prefixed


def test_a_factory_built_module_reports_its_arguments():
    abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0), hidden=64))
    merged = nnx.merge(*nnx.split(abstract))  # what the engine keeps: built without __init__
    assert module_hparams(merged)["hidden"] == 64
