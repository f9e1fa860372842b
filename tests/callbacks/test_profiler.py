"""Profiler: a trace of exactly the requested steps; host timing summary attributes time."""

import glob
import os
import time

import jax
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, Profiler, TensorBoardLogger
from meshfit.engine.run.timing import PhaseTimer
from tests.models import MLP, classification_data, quiet


def xplane_events(path):
    """(name, step_num or None, start_ns, end_ns, thread) of every event in a trace."""
    out = []
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                out.append((ev.name, stats.get("step_num"), ev.start_ns, ev.end_ns, line.name))
    return out


def test_trace_holds_exactly_the_requested_window(capsys):
    x, y = classification_data(n=256)
    profiler = Profiler(start_step=5, num_steps=3)
    engine = Engine(
        strategy="dp",
        max_steps=12,
        batch_size=32,
        log_every_n_steps=4,
        callbacks=[profiler, TensorBoardLogger()],
        enable_progress_bar=False,
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y))

    # next to the TensorBoard scalars, in the profile plugin's layout, one trace only
    tb_dir = engine.callbacks[1].log_dir
    files = glob.glob(os.path.join(tb_dir, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(files) == 1 and os.path.dirname(files[0]) == profiler.trace_dir
    assert profiler.traced_steps == [5, 6, 7]

    events = xplane_events(files[0])
    windows = sorted((s, a, b) for name, s, a, b, _ in events if name == "train")
    assert [s for s, _, _ in windows] == [5, 6, 7]
    dispatches = [(a, b) for name, _, a, b, _ in events if name == "PjitFunction(fused_train_step)"]
    assert dispatches, "the train step's dispatch should be in the trace"
    # every traced dispatch of the train step lies inside one of the three step annotations,
    # and each annotation holds some: nothing outside the window was traced
    inside = [[a0 <= a and b <= b0 for a, b in dispatches] for _, a0, b0 in windows]
    assert all(any(col) for col in zip(*inside, strict=True))
    assert all(any(row) for row in inside)
    assert len(dispatches) % 3 == 0 and len({sum(r) for r in inside}) == 1
    # no device work of earlier steps leaks in: no XLA thread starts anything before step 5
    xla = [a for _, _, a, _, line in events if line.startswith("tf_XLA")]
    assert xla and min(xla) >= windows[0][1]

    # the summary was printed at fit end and covers the loop
    out = capsys.readouterr()
    assert "Fit loop:" in out.out + out.err and "trace of steps 5..7" in (out.out + out.err).lower()
    assert engine.timings.steps == 12


def test_default_dir_without_logger_and_window_cut_short():
    x, y = classification_data(n=256)
    profiler = Profiler(start_step=2, num_steps=10, summary=False)
    engine = Engine(strategy="single", max_steps=4, batch_size=32, callbacks=[profiler], **quiet())
    engine.fit(MLP(nnx.Rngs(0)), (x, y))
    files = glob.glob(os.path.join("runs", "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(files) == 1
    steps = sorted(s for name, s, *_ in xplane_events(files[0]) if name == "train")
    assert steps == [2, 3] == profiler.traced_steps  # stopped with the run


def test_profiler_rejects_bad_arguments_before_compiling():
    with pytest.raises(ValueError, match="num_steps=0"):
        Profiler(num_steps=0)
    with pytest.raises(ValueError, match="start_step=-1"):
        Profiler(start_step=-1)
    engine = Engine(max_steps=5, callbacks=[Profiler(start_step=5)], **quiet())
    with pytest.raises(ValueError, match=r"would never start.*max_steps=5"):
        engine.fit(MLP(nnx.Rngs(0)), classification_data(n=64))
    assert engine.compiled_step is None


class SlowData:
    """An iterable of batches that takes `delay` seconds to produce each one."""

    def __init__(self, data, batch_size, delay):
        self.data, self.batch_size, self.delay = data, batch_size, delay
        self.loop_started, self.waits_in_loop = False, 0

    def __len__(self):
        return len(self.data[0]) // self.batch_size

    def __iter__(self):
        x, y = self.data
        for i in range(len(self)):
            time.sleep(self.delay)
            self.waits_in_loop += self.loop_started
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield x[sl], y[sl]


class SlowCallback(Callback):
    def __init__(self, delay, data):
        self.delay, self.data = delay, data

    def on_fit_start(self, engine):
        self.data.loop_started = True

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        time.sleep(self.delay)


def test_timings_attribute_host_time_to_data_and_callbacks():
    steps, data_delay, cb_delay = 10, 0.03, 0.02
    data = SlowData(classification_data(n=320), 32, data_delay)
    engine = Engine(
        strategy="single",
        max_steps=steps,
        batch_size=32,
        callbacks=[SlowCallback(cb_delay, data)],
        **quiet(),
    )
    engine.timings.enabled = True  # what a Profiler does; off by default for speed
    t0 = time.perf_counter()
    engine.fit(MLP(nnx.Rngs(0)), data)
    wall = time.perf_counter() - t0
    t = engine.timings.totals
    # batches produced inside the loop each made it wait (the first may be read earlier,
    # to compile the step)
    assert data.waits_in_loop >= steps - 1
    assert t["data"] == pytest.approx(data.waits_in_loop * data_delay, rel=0.25, abs=0.02)
    assert t["callbacks"] == pytest.approx(steps * cb_delay, rel=0.25, abs=0.03)
    assert t["step"] < t["data"] and t["validation"] == 0.0
    assert engine.timings.total <= wall and engine.timings.steps == steps
    assert "callbacks" in engine.timings.summary()


def test_phase_timer_is_exclusive_and_nests():
    """Each phase gets only its own time: a sleep never ends early, and under load it may
    end late, but by less than the 50 ms that counting a nested phase twice would add."""
    timer = PhaseTimer(enabled=True)
    timer.switch("step")  # not started: no-op
    assert timer.total == 0.0
    timer.start()
    time.sleep(0.1)  # data
    timer.begin_step()
    time.sleep(0.05)
    with timer.phase("validation"):
        time.sleep(0.05)
        with timer.phase("callbacks"):
            time.sleep(0.05)
    time.sleep(0.05)  # back in the step
    timer.stop()
    t = timer.totals
    for name, slept in {"data": 0.1, "step": 0.1, "validation": 0.05, "callbacks": 0.05}.items():
        assert slept - 0.002 <= t[name] < slept + 0.045, name
    assert sum(t.values()) == pytest.approx(timer.total, abs=1e-6)
    assert timer.steps == 1 and not timer.running
