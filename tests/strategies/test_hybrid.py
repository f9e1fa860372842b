"""Hybrid: data × fsdp × tensor meshes, placement from annotations or regex rules, validation."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from meshfit import Engine, TrainModule
from meshfit.engine.trees import max_device_bytes, tree_bytes
from meshfit.strategies import Hybrid, resolve_strategy
from tests.models import MLP, classification_data, quiet


class AnnotatedMLP(TrainModule):
    """Every parameter annotated with logical axis names (no biases, so all can shard 4 ways)."""

    def __init__(self, rngs: nnx.Rngs, features=16, hidden=64, classes=4):
        init = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(
            features, hidden, use_bias=False, rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
        )  # fmt: skip
        self.l2 = nnx.Linear(
            hidden, classes, use_bias=False, rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
        )  # fmt: skip

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))

    def training_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def configure_optimizers(self):
        return optax.adam(1e-2)


class PlainMLP(AnnotatedMLP):
    """The same layers without annotations (placed by regex rules instead)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(16, 64, use_bias=False, rngs=rngs)
        self.l2 = nnx.Linear(64, 4, use_bias=False, rngs=rngs)


def make_annotated():
    with nnx.use_eager_sharding(False):  # an instance built outside any mesh
        return AnnotatedMLP(nnx.Rngs(0))


def params_of(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fit(strategy, module, steps=20):
    engine = Engine(strategy=strategy, max_steps=steps, batch_size=64, **quiet())
    engine.fit(module, classification_data())
    return engine


def test_data_fsdp_tensor_with_annotations_matches_single_and_splits_state_4_ways():
    single = make_annotated()
    fit("single", single)
    module = make_annotated()
    engine = fit(Hybrid(data=2, fsdp=2, tensor=2, min_shard_bytes=0), module)
    assert max_abs_diff(params_of(single), params_of(module)) <= 1e-5
    assert max_abs_diff(params_of(single), params_of(make_annotated())) > 1e-3

    specs = engine.layout.param_specs  # "mlp" -> tensor from the annotation, then fsdp
    assert specs["l1/kernel"] == P("fsdp", "tensor") and specs["l2/kernel"] == P("tensor", "fsdp")
    total = tree_bytes(engine.state)
    per_device = max_device_bytes(engine.state)
    assert total / 4 <= per_device <= 1.01 * total / 4 + 64  # fsdp × tensor, plus scalars
    mu = engine.state.opt_state[0].mu
    assert mu["l2"]["kernel"][...].sharding.spec == P("tensor", "fsdp")


def test_data_tensor_mesh_shape_form_with_regex_rules_matches_single():
    single = MLP(nnx.Rngs(0), hidden=64)
    fit("single", single)
    module = MLP(nnx.Rngs(0), hidden=64)
    rules = {r".*l1/kernel": (None, "tensor"), r".*l1/bias": ("tensor",), r"l2/kernel": ("tensor",)}
    strategy = Hybrid(mesh_shape=(4, 2), axis_names=("data", "tensor"), rules=rules)
    engine = fit(strategy, module)
    assert max_abs_diff(params_of(single), params_of(module)) <= 1e-5
    assert dict(engine.mesh.shape) == {"data": 4, "tensor": 2}
    assert engine.state.params["l1"]["kernel"][...].sharding.spec == P(None, "tensor")
    assert engine.state.params["l2"]["kernel"][...].sharding.spec == P("tensor")
    assert engine.state.params["l2"]["bias"][...].sharding.is_fully_replicated


def test_regex_rules_and_annotations_give_identical_specs():
    from_annotations = Hybrid(data=2, fsdp=2, tensor=2, min_shard_bytes=0)
    from_rules = Hybrid(
        data=2, fsdp=2, tensor=2, min_shard_bytes=0,
        rules={r"l1/kernel": (None, "tensor"), r"l2/kernel": ("tensor", None)},
    )  # fmt: skip
    layouts = [
        Engine(strategy=strategy, max_steps=1, **quiet()).plan(module).layout  # layout only
        for strategy, module in (
            (from_annotations, make_annotated()),
            (from_rules, PlainMLP(nnx.Rngs(0))),
        )
    ]
    assert layouts[0].param_specs == layouts[1].param_specs
    # users can override the logical rules: "mlp" replicated leaves only fsdp
    override = Hybrid(data=2, fsdp=2, tensor=2, logical_rules={"mlp": None}, min_shard_bytes=0)
    layout = Engine(strategy=override, max_steps=1, **quiet()).plan(make_annotated()).layout
    assert layout.param_specs["l1/kernel"] == P(None, "fsdp")


def test_derived_sizes_and_presets():
    strategy = Hybrid(data=2, fsdp=2, tensor=2)
    strategy.setup(jax.devices())
    assert dict(strategy.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert strategy.data_axes == ("data", "fsdp")
    assert strategy.data_parallel_size == 4 and strategy.num_replicas == 2
    assert strategy.model_shards == 4 and strategy.per_device_batch_size(64) == 16
    preset = resolve_strategy("hybrid", 8)
    preset.setup(jax.devices())
    assert dict(preset.mesh.shape) == {"data": 2, "fsdp": 4}
    rest = Hybrid(data=2, tensor=-1)
    rest.setup(jax.devices())
    assert dict(rest.mesh.shape) == {"data": 2, "tensor": 4}
    tensor_only = Hybrid(tensor=8)
    tensor_only.setup(jax.devices())
    assert tensor_only.data_axes == () and tensor_only.batch_sharding(2).spec == P()
    assert tensor_only.data_parallel_size == 1 and tensor_only.num_replicas == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Hybrid(data=2, tensor=2), r"uses 4 devices, but 8 are available"),
        (lambda: Hybrid(data=4, fsdp=4), r"needs 16 devices \(data=4 × fsdp=4\), but only 8"),
        (
            lambda: Hybrid(data=8, rules={r".*kernel": (None, "tensor")}),
            r"names mesh axis 'tensor', but this mesh has only \('data',\)",
        ),
        (lambda: Hybrid(fsdp=8, logical_rules={"mlp": "tensor"}), r"maps 'mlp' to mesh axis"),
    ],
)
def test_mesh_errors_at_setup(make, message):
    with pytest.raises(ValueError, match=message):
        make().setup(jax.devices())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mesh_shape=(2, 4), axis_names=("data", "model")), r"Unknown mesh axis name 'model'"),
        (dict(mesh_shape=(2, 4), axis_names=("data",)), r"one name per dimension"),
        (dict(data=0), r"positive integer, or -1"),
        (dict(rules={r".*": (None, "model")}), r"unknown mesh axis 'model'"),
        (dict(data=2, mesh_shape=(8,), axis_names=("data",)), r"not both"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Hybrid(**kwargs)


def test_layout_errors_before_compile():
    x, y = classification_data(n=64)
    bad_dim = Engine(
        strategy=Hybrid(tensor=8, rules={r"l2/kernel": (None, "tensor")}), max_steps=1, **quiet()
    )
    with pytest.raises(
        ValueError, match=r"'l2/kernel' \(shape \(32, 4\)\) over 'tensor' of size 8"
    ):
        bad_dim.fit(MLP(nnx.Rngs(0)), (x, y))
    bad_batch = Engine(
        strategy=Hybrid(data=2, fsdp=2, tensor=2), max_steps=1, batch_size=6, **quiet()
    )
    with pytest.raises(ValueError, match=r"6 is not divisible by the 4 data-parallel devices"):
        bad_batch.fit(MLP(nnx.Rngs(0)), (x, y))

    class Unknown(AnnotatedMLP):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "experts"))
            self.l1 = nnx.Linear(16, 64, kernel_init=init, rngs=rngs)
            self.l2 = nnx.Linear(64, 4, rngs=rngs)

    with nnx.use_eager_sharding(False):
        unknown = Unknown(nnx.Rngs(0))
    engine = Engine(strategy=Hybrid(data=4, tensor=2), max_steps=1, **quiet())
    with pytest.raises(ValueError, match=r"logical axis 'experts'.*logical_rules="):
        engine.fit(unknown, (x, y))
    assert engine.compiled_step is None
