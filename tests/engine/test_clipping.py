"""Engine(gradient_clip_val=...): the global norm is global even when gradients are sharded."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, Stack, TrainModule
from meshfit.strategies import available_strategies
from tests.models import classification_data, quiet

# every registered placement (aliases and "auto" resolve to one of these)
STRATEGIES = [s for s in available_strategies() if s not in ("auto", "ddp")]


class Block(nnx.Module):
    def __init__(self, width, rngs):
        self.lin = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        return x + nnx.tanh(self.lin(x))


class Deep(TrainModule):
    """Input layer, a Stack of 8 residual blocks (pipelined under "pipeline"), a head."""

    def __init__(self, rngs, width=16, layers=8, lr=0.1):
        self.inp = nnx.Linear(16, width, rngs=rngs)
        self.blocks = Stack(lambda r: Block(width, r), layers, rngs=rngs)
        self.out = nnx.Linear(width, 4, rngs=rngs)
        self.lr = lr

    def __call__(self, x):
        return self.out(self.blocks(self.inp(x)))

    def training_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def configure_optimizers(self):
        return optax.sgd(self.lr)


def params_of(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def train(strategy, steps=4, n=256, **kwargs):
    module = Deep(nnx.Rngs(0))
    Engine(strategy=strategy, max_steps=steps, batch_size=64, **kwargs, **quiet()).fit(
        module, classification_data(n=n)
    )
    return params_of(module)


@pytest.fixture(scope="module")
def single_results():
    return {
        "none": train("single"),
        "norm": train("single", gradient_clip_val=0.05),
        "value": train("single", gradient_clip_val=0.002, gradient_clip_algorithm="value"),
    }


def test_clipping_is_active_in_the_reference(single_results):
    assert max_abs_diff(single_results["none"], single_results["norm"]) > 1e-3
    assert max_abs_diff(single_results["none"], single_results["value"]) > 1e-3
    assert max_abs_diff(single_results["norm"], single_results["value"]) > 1e-3


# dp and hybrid: see the composition test in tests/callbacks/test_accumulation.py
@pytest.mark.parametrize("strategy", [s for s in ("fsdp", "pipeline") if s in STRATEGIES])
def test_clip_by_global_norm_matches_single_device_with_sharded_gradients(strategy, single_results):
    clipped = train(strategy, gradient_clip_val=0.05)
    assert max_abs_diff(clipped, single_results["norm"]) <= 1e-5


@pytest.mark.parametrize("strategy", [s for s in ("pipeline",) if s in STRATEGIES])
def test_clip_by_value_matches_single_device_with_sharded_gradients(strategy, single_results):
    clipped = train(strategy, gradient_clip_val=0.002, gradient_clip_algorithm="value")
    assert max_abs_diff(clipped, single_results["value"]) <= 1e-5


def test_clip_norm_is_the_norm_of_all_gradients_together():
    """A clip between the largest leaf's norm and the global norm scales every gradient by
    clip / global norm: the norm is taken over all (sharded) gradients together."""
    module = Deep(nnx.Rngs(0))
    x, y = classification_data(n=64)

    def loss(p):
        m = nnx.merge(nnx.graphdef(module), p, nnx.state(module, nnx.Not(nnx.Param)))
        return m.training_step((x, y))

    init = nnx.state(module, nnx.Param)
    grads = jax.jit(jax.grad(loss))(init)
    total = float(optax.tree.norm(grads))
    biggest = max(float(optax.tree.norm(g)) for g in jax.tree.leaves(grads))
    clip = (biggest + total) / 2
    sharded = "fsdp" if "fsdp" in STRATEGIES else "dp"
    clipped = train(sharded, steps=1, n=64, gradient_clip_val=clip)  # the same 64 rows
    # one sgd step (lr 0.1) with the gradient scaled by exactly clip / total
    scale = 0.1 * clip / total
    expected = jax.tree.map(lambda p, g: np.asarray(p) - scale * np.asarray(g), init, grads)
    assert max_abs_diff(clipped, expected) <= 1e-6


def test_invalid_clip_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="gradient_clip_val"):
        Engine(max_steps=1, gradient_clip_val=0, **quiet())
    with pytest.raises(ValueError, match="gradient_clip_algorithm='l2'"):
        Engine(max_steps=1, gradient_clip_val=1.0, gradient_clip_algorithm="l2", **quiet())
