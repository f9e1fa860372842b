"""Throughput: steps/s agrees with an external stopwatch; FLOPs and MFU come out consistent."""

import time

import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, Throughput
from meshfit.callbacks.throughput import compiled_flops, peak_flops
from tests.models import MLP, classification_data, quiet


class Recorder(Callback):
    """Everything that reaches `on_log`, with the step it was logged at; and a stopwatch
    from when the loop is about to run (after compilation) to when it has finished."""

    def __init__(self):
        self.logs = []
        self.loop_start = self.loop_end = None

    def on_fit_start(self, engine):
        self.loop_start = time.perf_counter()

    def on_fit_end(self, engine):
        self.loop_end = time.perf_counter()  # the loop has waited for the last step

    def on_log(self, engine, metrics):
        self.logs.append((engine.global_step, dict(metrics)))


def test_steps_per_sec_matches_an_external_measurement():
    # The same run timed from outside: from the start of the loop to its end (not the
    # teardown after it, which at ~0.5 ms a step would weigh on 120 steps). Both clocks see
    # the same machine load, so the comparison holds on a busy machine.
    steps, every = 120, 20
    throughput, recorder = Throughput(), Recorder()
    engine = Engine(
        strategy="single",
        devices=1,
        max_steps=steps,
        batch_size=128,
        log_every_n_steps=every,
        callbacks=[throughput, recorder],
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0), features=64, hidden=256, opt="sgd"), classification_data(2048, 64))
    external = steps / (recorder.loop_end - recorder.loop_start)

    logged = [m["steps_per_sec"] for _, m in recorder.logs if "steps_per_sec" in m]
    assert len(logged) == steps // every  # every log_every_n_steps, through on_log
    # the run's rate from the logged windows (each `every` steps long)
    measured = steps / sum(every / rate for rate in logged)
    print(f"throughput {measured:.1f} steps/s, external {external:.1f} steps/s")
    assert measured == pytest.approx(external, rel=0.10)
    # samples/s is steps/s times the global batch; metrics also reach callback_metrics
    last = recorder.logs[-1][1]
    assert last["samples_per_sec"] == pytest.approx(128 * last["steps_per_sec"], rel=1e-9)
    assert engine.callback_metrics["steps_per_sec"] == last["steps_per_sec"]
    assert [m["step"] for m in throughput.history] == list(range(every, steps + 1, every))


def test_flops_from_cost_analysis_and_declared_mfu():
    x, y = classification_data(n=512)
    throughput, recorder = Throughput(), Recorder()
    engine = Engine(
        strategy="dp",
        max_steps=8,
        batch_size=64,
        log_every_n_steps=4,
        callbacks=[throughput, recorder],
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y))
    # cost_analysis() is per device: the whole step is 8 shards of the same program; the two
    # matmuls forward and backward alone are 3 * 2 * (16*32 + 32*4) * 64 FLOPs
    per_device = engine.compiled_step.cost_analysis()["flops"]
    assert throughput.flops_per_step == pytest.approx(8 * per_device)
    assert throughput.flops_per_step >= 3 * 2 * (16 * 32 + 32 * 4) * 64
    logged = [m for _, m in recorder.logs if "steps_per_sec" in m]
    assert len(logged) == 2 and all(
        m["flops_per_step"] == throughput.flops_per_step for m in logged
    )
    assert all("mfu" not in m for m in logged)  # CPU: no known peak, so no MFU

    # a declared peak gives MFU = flops/step * steps/s / (peak * devices)
    throughput, recorder = Throughput(flops_per_step=1e9, peak_flops=1e12), Recorder()
    engine = Engine(
        strategy="dp",
        max_steps=4,
        batch_size=64,
        log_every_n_steps=2,
        callbacks=[throughput, recorder],
        **quiet(),
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y))
    for _, m in recorder.logs:
        if "mfu" in m:
            assert m["mfu"] == pytest.approx(1e9 * m["steps_per_sec"] / (1e12 * 8))


def test_model_attribute_and_peak_table():
    class Declared(MLP):
        flops_per_step = 123.0

    throughput = Throughput()
    engine = Engine(
        strategy="single", max_steps=2, batch_size=32, callbacks=[throughput], **quiet()
    )
    engine.fit(Declared(nnx.Rngs(0)), classification_data(n=64))
    assert throughput.flops_per_step == 123.0

    class Kind:
        def __init__(self, kind):
            self.device_kind = kind

    assert peak_flops(Kind("NVIDIA H100 80GB HBM3"), "bf16") == 989e12
    assert peak_flops(Kind("NVIDIA H100 PCIe"), "bf16") == 756e12
    assert peak_flops(Kind("NVIDIA H200"), "fp32") == 494e12
    assert peak_flops(Kind("NVIDIA A100-SXM4-80GB"), "bf16") == 312e12
    assert peak_flops(Kind("TPU v5 lite"), "bf16") == 197e12
    assert peak_flops(Kind("TPU v4"), "fp32") == 275e12
    assert peak_flops(Kind("cpu"), "bf16") is None

    class NoCost:
        def cost_analysis(self):
            raise NotImplementedError

    assert compiled_flops(NoCost(), 8) is None
    with pytest.raises(ValueError, match="peak_flops=0"):
        Throughput(peak_flops=0)
