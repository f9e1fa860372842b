"""`Stack(remat=...)`: the same parameters as without remat, less compiled temp memory, also
under the pipeline schedule; the model summary names the policy; bad values fail clearly."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, Stack, TrainModule
from meshfit.callbacks import ModelSummary
from meshfit.engine.remat import resolve_remat
from meshfit.strategies import Pipeline
from tests.models import classification_data, quiet

DATA = classification_data(n=512)


class Block(nnx.Module):
    """A residual MLP block: its 4x-wide hidden activation is what remat stops storing."""

    def __init__(self, dim, rngs):
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.tanh(self.up(x)))


class Net(TrainModule):
    def __init__(self, rngs, remat=False):
        self.inp = nnx.Linear(16, 32, rngs=rngs)
        self.blocks = Stack(lambda r: Block(32, r), 8, rngs=rngs, remat=remat)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def training_step(self, batch):
        x, y = batch
        logits = self.out(self.blocks(self.inp(x)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def configure_optimizers(self):
        return optax.adam(1e-2)


def fit(strategy, remat, **kwargs):
    module = Net(nnx.Rngs(0), remat)
    engine = Engine(strategy=strategy, max_steps=10, batch_size=256, **quiet(**kwargs))
    engine.fit(module, DATA)
    params = jax.tree.map(np.asarray, nnx.state(module, nnx.Param))
    return engine, params


def temp_bytes(engine):
    return engine.compiled_step.memory_analysis().temp_size_in_bytes


def max_abs_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "strategy, policies",
    [
        ("single", [True, "dots_saveable"]),
        (Pipeline(stages=4, microbatches=4, data=2), ["nothing_saveable"]),
    ],
    ids=["scan", "pipeline"],
)
def test_remat_keeps_the_numbers_and_lowers_temp_memory(strategy, policies):
    base_engine, base = fit(strategy, False, enable_model_summary=False)
    base_temp = temp_bytes(base_engine)
    for policy in policies:
        engine, params = fit(strategy, policy, enable_model_summary=False)
        temp = temp_bytes(engine)
        diff = max_abs_diff(base, params)
        print(
            f"{engine.strategy.name} remat={policy!r}: temp {temp:,} B vs {base_temp:,} B "
            f"without remat; max |param diff| after 10 steps {diff:.2e}"
        )
        assert diff <= 1e-6
        assert temp < base_temp


def test_summary_shows_the_policy_per_stack():
    engine, _ = fit("single", "dots_saveable")
    (summary,) = [cb for cb in engine.callbacks if isinstance(cb, ModelSummary)]
    assert "stacks: blocks (8 layers, remat dots_saveable)" in summary.text
    engine, _ = fit("single", False)
    (summary,) = [cb for cb in engine.callbacks if isinstance(cb, ModelSummary)]
    assert "stacks: blocks (8 layers, remat off)" in summary.text


def test_policy_functions_and_bad_values():
    policy = jax.checkpoint_policies.save_only_these_names("h")
    assert resolve_remat(policy).policy is policy
    assert resolve_remat(True).name == "full" and resolve_remat(False) is None
    with pytest.raises(ValueError, match=r"remat='dots'.*dots_saveable"):
        Net(nnx.Rngs(0), remat="dots")
    with pytest.raises(TypeError, match=r"remat=\.\.\..*got int"):
        Net(nnx.Rngs(0), remat=3)
