"""ModelCheckpoint(every_n_seconds=..., keep_every_n_steps=...): time-based saves at step
boundaries (the same step on every process), permanent snapshots that top-k never deletes."""

import itertools
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental import multihost_utils

import meshfit
from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from meshfit.engine.checkpoint.format import read_meta
from meshfit.engine.checkpoint.format import reader as _reader
from tests.engine.test_distributed import ROOT, child_env
from tests.models import MLP, classification_data, quiet

DATA = classification_data(n=320)  # 5 batches of 64 per epoch
VAL = (DATA[0][:128], DATA[1][:128])
MP_SCRIPT = os.path.join(ROOT, "tests", "callbacks", "mp_checkpoint.py")


def steps_in(directory):
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def fit(mc, max_steps, *callbacks, after=(), **kwargs):
    engine = Engine(
        strategy="single",
        max_steps=max_steps,
        batch_size=64,
        callbacks=[*callbacks, mc, *after],
        **quiet(enable_model_summary=False, **kwargs),
    )
    engine.fit(MLP(nnx.Rngs(0)), DATA, val_data=VAL)
    return engine


def test_keep_every_n_steps_keeps_snapshots_beside_the_newest(tmp_path):
    fit(ModelCheckpoint(tmp_path, every_n_steps=3, keep_every_n_steps=10), 35)
    assert steps_in(tmp_path) == [10, 20, 30, 35]  # every 3 steps saved, newest + snapshots kept


def test_snapshots_are_not_ranked_among_the_best(tmp_path):
    mc = ModelCheckpoint(tmp_path, monitor="val_acc", mode="max", keep_every_n_steps=4)
    engine = fit(mc, 15, val_every_n_steps=5)
    kept = steps_in(tmp_path)
    assert {4, 8, 12, 15} <= set(kept) and mc.best_model_step in (5, 10, 15)
    assert set(kept) == {4, 8, 12, 15, mc.best_model_step}
    manager = _reader(str(tmp_path))
    for step in (4, 8, 12):  # saved between validations: no stale score recorded
        assert read_meta(manager, step)["monitor"]["score"] is None
    assert mc.best_model_score == max(
        read_meta(manager, s)["monitor"]["score"] for s in kept if s % 5 == 0
    )
    assert engine.global_step == 15


class Done(Callback):
    """Records when each step's hooks are done: right after ModelCheckpoint's (a save in it
    restarts its clock). At an epoch's last step, after its epoch end: the save waits for the
    epoch-end validation, which may take longer than the test's slack on a busy machine."""

    run_last = True

    def __init__(self):
        self.at = {}

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.at[engine.global_step] = time.monotonic()

    def on_train_epoch_end(self, engine):
        self.at[engine.global_step] = time.monotonic()


class Sleep(Callback):
    """Makes each step take at least `seconds`, and records when each step ended: right
    before ModelCheckpoint reads its clock (both run last, in this order)."""

    run_last = True

    def __init__(self, seconds):
        self.seconds, self.ended = seconds, {}

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        time.sleep(self.seconds)
        self.ended[engine.global_step] = time.monotonic()


def test_every_n_seconds_saves_at_the_first_step_after_the_interval(tmp_path, monkeypatch):
    def no_collectives(*args, **kwargs):
        raise AssertionError("a single process needs no collective to decide")

    monkeypatch.setattr(multihost_utils, "process_allgather", no_collectives)
    every, sleep, done = 0.3, Sleep(0.05), Done()
    mc = ModelCheckpoint(tmp_path, every_n_seconds=every, save_top_k=-1)
    fit(mc, 40, sleep, after=[done])
    saved = steps_in(tmp_path)
    print("saved at steps", saved)
    assert len(saved) >= 4 and saved[-1] == 40  # time-based saves, then the final one
    slack = 0.01  # the recorders' clock readings are a moment off the checkpoint's
    for a, b in itertools.pairwise(saved[:-1]):  # the last one is the final save
        # the clock restarts once save `a` is handed to the writer: between the two readings
        assert sleep.ended[b] - sleep.ended[a] >= every - slack, (a, b)  # not before...
        assert sleep.ended[b - 1] - done.at[a] < every + slack, (a, b)  # ...the first after


def test_cadences_are_exclusive_and_checked():
    with pytest.raises(ValueError, match="not every_n_steps and every_n_seconds"):
        ModelCheckpoint(every_n_steps=10, every_n_seconds=60)
    with pytest.raises(ValueError, match=r"every_n_seconds=0\)"):
        ModelCheckpoint(every_n_seconds=0)
    with pytest.raises(ValueError, match=r"keep_every_n_steps=-1"):
        ModelCheckpoint(keep_every_n_steps=-1)
    ModelCheckpoint(every_n_seconds=1.5, keep_every_n_steps=100)  # combines with keeping


def test_every_n_seconds_saves_at_the_same_step_on_two_processes(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshfit.launch",
            "--nproc",
            "2",
            "--cpu-devices-per-process",
            "2",
            MP_SCRIPT,
            str(tmp_path / "ck"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [
        line.split("saved at ", 1)[1] for line in res.stdout.splitlines() if "saved at" in line
    ]
    assert len(lines) == 2 and lines[0] == lines[1], res.stdout  # both processes, same steps
    saved = [int(s) for s in lines[0].split(",")]
    print("both processes saved at steps", saved)
    timed = saved[:-1]  # the last one is the final save at the end of fit
    assert len(timed) >= 2 and all(s % 10 == 0 for s in timed), saved  # at the sync cadence
    assert steps_in(tmp_path / "ck") == saved  # one checkpoint per step, written together
    # and it reads back in one process (packed leaves written by two): the trained weights
    module = meshfit.load_weights(MLP(nnx.Rngs(1)), tmp_path / "ck")
    final = np.load(tmp_path / "ck.npz")
    params = jax.tree.leaves(nnx.state(module, nnx.Param))
    assert len(params) == len(final.files) == 4
    for p, name in zip(params, final.files, strict=True):
        np.testing.assert_array_equal(np.asarray(p), final[name])
