"""`Stack`: stacked init, sequential semantics, one compiled loop body, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, Stack, TrainModule
from meshfit.engine.stack import STACK_METADATA, stack_executor
from tests.models import quiet

CALLS = []


class Block(nnx.Module):
    def __init__(self, dim, rngs, dropout=0.0):
        self.lin = nnx.Linear(dim, dim, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x):
        CALLS.append(1)
        h = nnx.tanh(self.lin(x))
        return x + (self.drop(h) if self.drop is not None else h)


def test_layers_are_stacked_and_initialised_independently():
    stack = Stack(lambda r: Block(8, r), 5, rngs=nnx.Rngs(0))
    kernel = stack.layers.lin.kernel
    assert kernel.shape == (5, 8, 8) and stack.layers.lin.bias.shape == (5, 8)
    assert kernel.get_metadata()[STACK_METADATA] == 5
    k = np.asarray(kernel[...])
    assert min(np.abs(k[i] - k[j]).max() for i in range(5) for j in range(i)) > 1e-2


def test_call_applies_the_layers_in_order_as_one_loop():
    stack = Stack(lambda r: Block(8, r), 6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8))
    k, b = np.asarray(stack.layers.lin.kernel[...]), np.asarray(stack.layers.lin.bias[...])
    expected = np.asarray(x)
    for i in range(6):
        expected = expected + np.tanh(expected @ k[i] + b[i])
    CALLS.clear()
    graphdef, state = nnx.split(stack)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert np.abs(np.asarray(y) - expected).max() < 1e-5
    assert len(CALLS) == 1  # the layer body is traced once for 6 layers: a scan, not unrolled


def test_a_strategy_can_take_over_execution():
    stack = Stack(lambda r: Block(4, r), 2, rngs=nnx.Rngs(0))
    seen = []
    with stack_executor(lambda s, x: seen.append(s) or x * 0):
        out = stack(jnp.ones((2, 4)))
    assert seen == [stack] and float(jnp.abs(out).max()) == 0.0
    assert float(jnp.abs(stack(jnp.ones((2, 4))) - 1).max()) > 0  # default: the layers again


def test_non_parameter_state_of_layers_is_carried():
    """Dropout RNG counts inside the stack advance once per call, for every layer."""

    class Net(TrainModule):
        def __init__(self, rngs):
            self.stack = Stack(lambda r: Block(8, r, dropout=0.5), 3, rngs=rngs)

        def training_step(self, batch):
            (x,) = batch
            return (self.stack(x) ** 2).mean()

        def configure_optimizers(self):
            return optax.sgd(0.1)

    module = Net(nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    Engine(strategy="dp", max_steps=4, batch_size=16, **quiet()).fit(module, (x,))
    counts = np.asarray(module.stack.layers.drop.rngs.count[...])
    assert counts.tolist() == [4, 4, 4]


def test_bad_arguments_and_shape_changing_layers_fail_clearly():
    with pytest.raises(ValueError, match="positive integer"):
        Stack(lambda r: Block(4, r), 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="callable"):
        Stack(Block(4, nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"must return an nnx\.Module"):
        Stack(lambda r: 3, 2, rngs=nnx.Rngs(0))
    widen = Stack(lambda r: nnx.Linear(4, 6, rngs=r), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="same shape"):
        widen(jnp.ones((2, 4)))
