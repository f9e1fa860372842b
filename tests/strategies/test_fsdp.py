"""FSDP: parameters and optimizer state sharded 8 ways, same training as one device."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from meshfit import Engine
from meshfit.engine.trees import max_device_bytes, tree_bytes
from meshfit.strategies import FSDP, resolve_strategy
from tests.models import MLP, classification_data, quiet


def params_of(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fit(strategy, steps=20, **kwargs):
    module = MLP(nnx.Rngs(0), hidden=256)  # l1/kernel 16 KiB, l2/kernel 4 KiB: sharded
    engine = Engine(strategy=strategy, max_steps=steps, batch_size=64, **quiet(**kwargs))
    engine.fit(module, classification_data())
    return engine, params_of(module)


def replicated_bytes(state):
    leaves = [x for x in jax.tree.leaves(state) if x.sharding.is_fully_replicated]
    return tree_bytes(leaves)


def test_fsdp_shards_state_8_ways_and_matches_single_device():
    _, single = fit("single")
    engine, fsdp = fit("fsdp")
    assert isinstance(engine.strategy, FSDP)
    assert max_abs_diff(single, fsdp) <= 1e-5
    assert max_abs_diff(single, params_of(MLP(nnx.Rngs(0), hidden=256))) > 1e-3  # it trained

    total, small = tree_bytes(engine.state), replicated_bytes(engine.state)
    per_device = max_device_bytes(engine.state)
    assert small < 0.1 * total  # only biases and the step counters stay replicated
    assert per_device <= 1.05 * total / 8 + small
    # the large parameters and their Adam moments share one layout: largest divisible dim
    specs = engine.layout.param_specs
    assert specs["l1/kernel"] == P(None, "fsdp") and specs["l2/kernel"] == P("fsdp", None)
    assert specs["l1/bias"] == P()  # 1 KiB < min_shard_bytes
    adam = engine.state.opt_state[0]
    for moment in (adam.mu, adam.nu):
        assert moment["l1"]["kernel"][...].sharding.spec == P(None, "fsdp")
        assert moment["l2"]["kernel"][...].sharding.spec == P("fsdp", None)


def test_gradient_clipping_by_global_norm_under_fsdp_matches_single_device():
    _, unclipped = fit("single", steps=5)
    _, single = fit("single", steps=5, gradient_clip_val=0.05)
    _, fsdp = fit(FSDP(min_shard_bytes=0), steps=5, gradient_clip_val=0.05)
    assert max_abs_diff(single, unclipped) > 1e-4  # the clip is active
    assert max_abs_diff(single, fsdp) <= 1e-5


def test_fsdp_derived_sizes_and_batch_validation():
    strategy = resolve_strategy("fsdp", 8)
    strategy.setup(jax.devices())
    assert dict(strategy.mesh.shape) == {"fsdp": 8}
    assert strategy.data_parallel_size == 8 and strategy.num_replicas == 1
    assert strategy.per_device_batch_size(64) == 8
    engine = Engine(strategy="fsdp", max_steps=1, batch_size=60, **quiet())
    with pytest.raises(ValueError, match=r"60 is not divisible by the 8 data-parallel"):
        engine.fit(MLP(nnx.Rngs(0)), classification_data())
    assert engine.compiled_step is None  # rejected before compiling


def test_min_shard_bytes_must_be_non_negative():
    with pytest.raises(ValueError, match="min_shard_bytes"):
        FSDP(min_shard_bytes=-1)
