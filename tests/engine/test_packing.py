"""Packing small replicated leaves for a save, unpacking them onto any layout, and the format 3
checkpoint on disk (no orbax `_sharding` file; format 2 still read)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import meshfit
from meshfit import Engine
from meshfit.callbacks import ModelCheckpoint
from meshfit.engine.checkpoint import format as ckpt_format
from meshfit.engine.checkpoint import packing, writer
from meshfit.strategies.base import make_mesh
from tests.models import MLP, classification_data, quiet

DATA = classification_data(n=256)


def test_pack_then_unpack_onto_another_layout(monkeypatch):
    monkeypatch.setattr(packing, "MAX_PACKED_BYTES", 64)
    mesh = make_mesh((8,), ("fsdp",), jax.devices())
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("fsdp"))
    item = {
        "params": {"w": jax.device_put(jnp.arange(8.0), replicated), "big": jnp.ones(32)},
        "state": {
            "step": jax.device_put(jnp.int32(7), replicated),
            "mu": jax.device_put(jnp.arange(16.0), sharded),
            "k": jax.device_put(jnp.arange(3, dtype=jnp.uint32), replicated),
        },
    }
    saved, layout = packing.pack(item)
    # packed: the small replicated leaves; "big" (128 B) and the sharded "mu" stay arrays
    assert saved["params"]["w"] is None and saved["state"]["step"] is None
    assert saved["params"]["big"] is item["params"]["big"] and saved["state"]["mu"] is not None
    assert {d: a.shape for d, a in saved[packing.PACKED].items()} == {
        "float32": (8,),
        "int32": (1,),
        "uint32": (3,),
    }
    assert packing.packed_shapes(layout, "params") == {"w": ((8,), "float32")}
    assert json.loads(json.dumps(layout)) == layout  # it goes into the JSON meta

    def layout_of(x):  # restored onto another layout: sharded wherever 8 divides
        divides = x.ndim and x.shape[0] % 8 == 0
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded if divides else replicated)

    target = jax.tree.map(layout_of, item)
    restore_item, args = packing.restore_target(target, layout)
    assert restore_item["params"]["w"] is None and packing.PACKED in args
    back = packing.unpack(dict(saved), target, layout)  # what orbax gives back for that target
    for a, b in zip(jax.tree.leaves(item), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back["params"]["w"].sharding == sharded


def fit(root, strategy, max_steps, ckpt_path=None):
    module = MLP(nnx.Rngs(0))
    engine = Engine(
        strategy=strategy,
        max_steps=max_steps,
        batch_size=32,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(every_n_steps=5, save_top_k=-1)],
        **quiet(enable_model_summary=False),
    )
    engine.fit(module, DATA, ckpt_path=ckpt_path)
    return module


def files_under(path):
    return [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]


def test_a_single_device_checkpoint_is_two_arrays_and_no_sharding_file(tmp_path):
    module = fit(tmp_path, "single", 5)
    step = tmp_path / "checkpoints" / "5"
    meta = json.loads((step / "meta" / "metadata").read_text())
    assert meta["format"] == ckpt_format.FORMAT_VERSION == 3
    assert sorted(meta["packed"]) == ["float32", "int32"]  # params + adam moments; counts, step
    names = {row[1] for rows in meta["packed"].values() for row in rows}
    assert {"params/l1/kernel", "params/l2/bias", "state/step"} <= names
    assert not [f for f in files_under(step) if os.path.basename(f) == "_sharding"]
    weights = meshfit.load_weights(MLP(nnx.Rngs(1)), step)  # the packed params come back
    for a, b in zip(jax.tree.leaves(nnx.state(module)), jax.tree.leaves(nnx.state(weights))):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def format_2_handlers():
    return {"train": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def test_format_2_checkpoints_still_resume(tmp_path, monkeypatch):
    """A format 2 checkpoint (every leaf an array of its own, `_sharding` files, no "packed")
    resumes bitwise like a format 3 one."""
    reference = fit(tmp_path / "ref", "single", 10)
    with monkeypatch.context() as m:  # the writer as format 2 had it
        m.setattr(packing, "MAX_PACKED_BYTES", -1)  # nothing packed
        m.setattr(ckpt_format, "FORMAT_VERSION", 2)
        m.setattr(writer, "item_handlers", format_2_handlers)
        fit(tmp_path / "old", "single", 5)
    step = tmp_path / "old" / "checkpoints" / "5"
    assert [f for f in files_under(step) if os.path.basename(f) == "_sharding"]
    meta = json.loads((step / "meta" / "metadata").read_text())
    meta.pop("packed")  # format 2 did not have it
    (step / "meta" / "metadata").write_text(json.dumps(meta))
    assert meta["format"] == 2
    resumed = fit(tmp_path / "old", "single", 10, ckpt_path=step)
    for a, b in zip(
        jax.tree.leaves(nnx.state(reference, nnx.Param)),
        jax.tree.leaves(nnx.state(resumed, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
