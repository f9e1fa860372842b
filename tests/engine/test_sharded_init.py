"""Sharded initialization: a factory is built directly in the strategy's layout."""

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from meshfit import Engine
from meshfit.engine.trees import tree_bytes
from meshfit.strategies import FSDP, Hybrid
from tests.models import MLP, classification_data, quiet
from tests.strategies.test_hybrid import AnnotatedMLP, make_annotated


class Frozen(MLP):
    """lr 0 with SGD: one step leaves the parameters as initialised."""

    def configure_optimizers(self):
        return optax.sgd(0.0)


def params_of(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def identical(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_factory_and_instance_give_identical_parameters_and_factory_init_is_sharded():
    data = classification_data(n=64)
    instance = Frozen(nnx.Rngs(0), hidden=256)
    Engine(strategy=FSDP(), max_steps=1, batch_size=64, **quiet()).fit(instance, data)
    engine = Engine(strategy=FSDP(), max_steps=1, batch_size=64, **quiet())
    engine.fit(lambda: Frozen(nnx.Rngs(0), hidden=256), data)
    fresh = params_of(Frozen(nnx.Rngs(0), hidden=256))
    for got in (params_of(instance), params_of(engine.module)):
        assert identical(fresh, got)  # bitwise

    # the init program itself produces sharded outputs: no device ever holds the whole model
    out = engine.init_compiled.output_shardings
    assert out.params["l1"]["kernel"].spec == P(None, "fsdp")
    per_device_out = engine.init_compiled.memory_analysis().output_size_in_bytes
    total = tree_bytes(engine.state)
    assert per_device_out < 0.2 * total


def test_annotated_model_from_a_factory_is_placed_by_its_annotations():
    data = classification_data(n=64)
    engine = Engine(strategy=Hybrid(data=4, tensor=2), max_steps=1, batch_size=64, **quiet())
    engine.fit(lambda: AnnotatedMLP(nnx.Rngs(0)), data)
    assert engine.init_compiled.output_shardings.params["l1"]["kernel"].spec == P(None, "tensor")
    instance = make_annotated()
    Engine(strategy=Hybrid(data=4, tensor=2), max_steps=1, batch_size=64, **quiet()).fit(
        instance, data
    )
    assert identical(params_of(instance), params_of(engine.module))
