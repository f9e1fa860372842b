"""ModelSummary and the hardware report: printed at fit start, built from real numbers."""

import jax
from flax import nnx

from meshfit import Engine, hardware_info, hardware_report
from meshfit.callbacks import ModelSummary
from meshfit.engine.hardware import format_bytes
from meshfit.strategies import FSDP
from tests.models import MLP, classification_data, quiet


def test_summary_is_on_by_default_and_reports_layout_mesh_memory_and_flops(capsys):
    engine = Engine(strategy=FSDP(min_shard_bytes=0), max_steps=1, batch_size=64, **quiet())
    (summary,) = [cb for cb in engine.callbacks if isinstance(cb, ModelSummary)]
    engine.fit(MLP(nnx.Rngs(0), hidden=64), classification_data(n=64))
    out = capsys.readouterr().out
    text = summary.text
    assert text in out and out.index("[meshfit] hardware:") < out.index(text)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("l1/kernel"))
    # 16 x 64 float32 = 4 KiB, split 8 ways on its largest dim
    assert "(16, 64)" in row and "float32" in row and "(None, 'fsdp')" in row
    assert row.endswith("512 B")
    assert "l2/bias" in text and "replicated" in text  # 4 rows cannot split 8 ways
    count = 16 * 64 + 64 + 64 * 4 + 4
    assert f"parameters: {count:,} " in text
    assert "mesh: (fsdp=8) axis names ('fsdp',); device ids [0, 1, 2, 3, 4, 5, 6, 7]" in text
    assert f"strategy: {engine.strategy.describe()}" in text
    memory = engine.compiled_step.memory_analysis()
    flops = engine.compiled_step.cost_analysis()["flops"]
    assert f"{flops:.3g} FLOPs per step" in text and flops > 0
    expected = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.generated_code_size_in_bytes
    )
    assert f"compiled step: {format_bytes(expected)} per device" in text


def test_summary_can_be_turned_off():
    engine = Engine(strategy="dp", max_steps=1, enable_model_summary=False, **quiet())
    assert not any(isinstance(cb, ModelSummary) for cb in engine.callbacks)
    mine = ModelSummary(max_rows=1)
    engine = Engine(strategy="dp", max_steps=1, callbacks=[mine], **quiet())
    assert [cb for cb in engine.callbacks if isinstance(cb, ModelSummary)] == [mine]


def test_hardware_report_facts():
    info = hardware_info()
    assert info["platform"] == "cpu" and info["devices"] == 8 == info["global_devices"]
    assert info["local_devices"] == 8 and info["processes"] == 1
    assert info["memory_per_device"] is None  # CPU reports no allocator limit
    report = hardware_report(jax.devices()[:2])
    assert "2 device(s) in use" in report and "memory per device unknown" in report
