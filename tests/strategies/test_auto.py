"""strategy="auto": single on one device, dp while the replicated state fits, else fsdp."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from meshfit import Engine
from meshfit.strategies import FSDP, DataParallel, SingleDevice, auto
from tests.models import MLP, classification_data, quiet


def abstract_state(hidden=256):
    engine = Engine(strategy="dp", max_steps=1, **quiet())
    return engine.plan(MLP(nnx.Rngs(0), hidden=hidden)).abstract


def test_choice_follows_state_bytes_against_device_memory():
    state = abstract_state()
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    need += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    assert auto.choose_strategy(state, 1, None).name == "single"
    unknown = auto.choose_strategy(state, 8, None)
    assert unknown.name == "dp" and "not reported" in unknown.reason
    assert auto.choose_strategy(state, 8, 2 * need).name == "dp"  # exactly at the 50% budget
    tight = auto.choose_strategy(state, 8, 2 * need - 1)
    assert tight.name == "fsdp" and "exceeds 50%" in tight.reason


@pytest.mark.parametrize(
    ("devices", "memory", "expected"),
    [(1, None, SingleDevice), (8, None, DataParallel), (8, 10_000, FSDP)],
)
def test_engine_auto_decides_once_the_state_is_known(
    monkeypatch, capsys, devices, memory, expected
):
    monkeypatch.setattr(auto, "device_memory_limit", lambda _devices: memory)
    engine = Engine(strategy="auto", devices=devices, max_steps=2, batch_size=64, **quiet())
    engine.fit(MLP(nnx.Rngs(0), hidden=256), classification_data(n=128))
    assert type(engine.strategy) is expected
    assert engine.strategy.mesh.devices.size == devices
    out = capsys.readouterr().out
    assert f"strategy 'auto' -> '{expected.name}'" in out
    if expected is FSDP:  # the state really is sharded (it did not fit 50% of 10 kB)
        assert engine.state.params["l1"]["kernel"][...].sharding.spec == P(None, "fsdp")
        assert "exceeds 50% of the 9.77 KiB per device" in out
