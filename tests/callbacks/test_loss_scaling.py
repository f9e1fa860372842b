"""DynamicLossScaling: overflowing steps are skipped bitwise, the scale moves, state persists."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, DynamicLossScaling
from tests.models import MLP, classification_data, quiet


class Recorder(Callback):
    """Copies the state after every step (a device read per step: fine in a test)."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.states.append(jax.tree.map(np.array, jax.device_get(engine.state)))


def batches(n, poisoned=(), bs=64):
    x, y = classification_data(n=n * bs)
    out = []
    for i in range(n):
        xb = x[i * bs : (i + 1) * bs]
        out.append((xb * 1000.0 if i in poisoned else xb, y[i * bs : (i + 1) * bs]))
    return out


def test_an_overflowing_fp16_step_is_skipped_bitwise_and_the_scale_halved():
    rec = Recorder()
    engine = Engine(
        strategy="dp",
        max_epochs=1,
        batch_size=64,
        precision="fp16",
        log_every_n_steps=1,
        callbacks=[DynamicLossScaling(), rec],
        **quiet(),
    )
    logged = []
    engine.callbacks.append(type("L", (Callback,), {"on_log": lambda s, e, m: logged.append(m)})())
    engine.fit(MLP(nnx.Rngs(0)), batches(5, poisoned={2}))
    s = rec.states
    ls = [st.extra["DynamicLossScaling"] for st in s]

    # step 2 overflowed in the fp16 backward pass (x * 1000, scale 2**15) ...
    assert [float(e["loss_scale"]) for e in ls] == [2.0**15] * 2 + [2.0**14] * 3
    assert [int(e["skipped_steps"]) for e in ls] == [0, 0, 1, 1, 1]
    # ... so nothing but the scaler's own state changed: params, optimizer state, step counter
    for a, b in zip(
        jax.tree.leaves((s[1].params, s[1].opt_state, s[1].step, s[1].rest)),
        jax.tree.leaves((s[2].params, s[2].opt_state, s[2].step, s[2].rest)),
    ):
        np.testing.assert_array_equal(a, b)
    assert int(s[2].step) == 2 and engine.global_step == 5 and int(s[4].step) == 4
    # the next step trains again
    assert not np.array_equal(s[3].params["l1"]["kernel"], s[2].params["l1"]["kernel"])
    assert np.all(np.isfinite(s[4].params["l1"]["kernel"]))
    # logged: the scale and the running count of skipped steps
    assert [m["skipped_steps"] for m in logged] == [0, 0, 1, 1, 1]
    assert [m["loss_scale"] for m in logged] == [2.0**15] * 2 + [2.0**14] * 3


def test_the_scale_grows_exactly_at_the_growth_interval():
    rec = Recorder()
    engine = Engine(
        strategy="single",
        max_epochs=1,
        batch_size=64,
        callbacks=[DynamicLossScaling(init_scale=8.0, growth_interval=3, factor=2), rec],
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0)), batches(8))
    scales = [float(st.extra["DynamicLossScaling"]["loss_scale"]) for st in rec.states]
    goods = [int(st.extra["DynamicLossScaling"]["good_steps"]) for st in rec.states]
    assert scales == [8, 8, 16, 16, 16, 32, 32, 32]  # x2 after steps 3 and 6, not before
    assert goods == [1, 2, 0, 1, 2, 0, 1, 2]


def test_overflow_resets_the_growth_counter():
    scaler = DynamicLossScaling(init_scale=4.0, growth_interval=2, factor=4, min_scale=1.0)
    state = scaler.init(None)
    grads = {"w": jnp.ones((3,), jnp.float32)}
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0], jnp.float32)}
    trace, unscaled = [], []
    for g in (grads, bad, grads, bad, bad, grads, grads):
        out, state, ok = scaler.process_grads(g, state)
        trace.append((float(state["loss_scale"]), int(state["good_steps"]), bool(ok)))
        unscaled.append(out["w"])
    assert trace == [
        (4, 1, True),
        (1, 0, False),
        (1, 1, True),
        (1, 0, False),  # never below min_scale
        (1, 0, False),
        (1, 1, True),
        (4, 0, True),  # grown after 2 finite steps in a row
    ]
    np.testing.assert_array_equal(unscaled[0], np.full(3, 0.25, np.float32))  # divided by 4
    np.testing.assert_array_equal(unscaled[-1], np.ones(3, np.float32))  # by 1


def test_state_survives_an_orbax_round_trip(tmp_path):
    engine = Engine(
        strategy="dp",
        max_epochs=1,
        batch_size=64,
        precision="fp16",
        callbacks=[DynamicLossScaling(growth_interval=2)],
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0)), batches(5, poisoned={1}))
    extra = engine.state.extra
    assert float(extra["DynamicLossScaling"]["loss_scale"]) == 2.0**15  # halved, grown back
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "extra", extra)
        ckptr.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, extra)
        restored = ckptr.restore(tmp_path / "extra", abstract)
    for a, b in zip(jax.tree.leaves(extra), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)


def test_resume_from_a_model_checkpoint_restores_the_scaler(tmp_path):
    mc = pytest.importorskip("meshfit.callbacks.checkpoint")

    def run(max_steps, ckpt_path=None, save=True):
        cbs = [DynamicLossScaling(init_scale=8.0, growth_interval=3)]
        if save:
            cbs.append(mc.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_steps=4))
        engine = Engine(
            strategy="single", max_steps=max_steps, batch_size=64, callbacks=cbs, **quiet()
        )
        engine.fit(MLP(nnx.Rngs(0)), classification_data(n=512), ckpt_path=ckpt_path)
        return jax.device_get(engine.state)

    full = run(6, save=False)
    run(4)
    resumed = run(6, ckpt_path="last")
    assert float(resumed.extra["DynamicLossScaling"]["loss_scale"]) == 32.0
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="growth_interval"):
        DynamicLossScaling(growth_interval=0)
    with pytest.raises(ValueError, match="factor"):
        DynamicLossScaling(factor=1)
    with pytest.raises(ValueError, match="init_scale"):
        DynamicLossScaling(init_scale=-1)
