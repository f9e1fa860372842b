"""Grain pipelines resume exactly after SIGKILL: a MapDataset source with a random augmentation
read by 2 worker processes, and an IterDataset whose iterator state is checkpointed (the resume
reads nothing before the checkpoint's position)."""

import json
import random
import signal
import subprocess
import sys
import threading

import grain
import numpy as np

from tests.engine import data_script
from tests.engine.test_resume import assert_bitwise, child_env, finish, signal_at

SCRIPT = data_script.__file__
TOTAL = 12  # 5 batches an epoch: the run crosses two epoch boundaries


def start(jobs):
    return subprocess.Popen(
        [sys.executable, SCRIPT, json.dumps(jobs)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_grain_pipelines_resume_bitwise_after_sigkill(tmp_path):
    kinds = ("source", "iter")
    steps = {kind: random.Random().randint(3, 9) for kind in kinds}
    dirs = {kind: str(tmp_path / kind) for kind in kinds}
    children = {
        kind: start([dict(kind=kind, dir=dirs[kind], max_steps=TOTAL, every_n_steps=1, sleep=0.05)])
        for kind in kinds
    }
    outputs = {}
    watchers = [
        threading.Thread(
            target=lambda k=kind: outputs.update(
                {k: signal_at(children[k], steps[k], signal.SIGKILL)}
            )
        )
        for kind in kinds
    ]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join()
    for kind in kinds:
        assert children[kind].returncode == -signal.SIGKILL, outputs[kind][-2000:]

    resumed = [
        dict(kind=kind, out=str(tmp_path / f"{kind}.npz"), dir=dirs[kind], max_steps=TOTAL,
             resume="last")
        for kind in kinds
    ]  # fmt: skip
    finish(start(resumed), timeout=240)
    for kind in kinds:
        ref = str(tmp_path / f"ref-{kind}.npz")
        data_script.run(
            dict(kind=kind, out=ref, dir=str(tmp_path / f"ref-{kind}"), max_steps=TOTAL)
        )
        assert_bitwise(dict(np.load(tmp_path / f"{kind}.npz")), dict(np.load(ref)))

    # The IterDataset resumed from its saved iterator state: the first records it read are
    # those right after the checkpoint's position, none of the batches before it.
    with open(tmp_path / "iter.npz.json") as f:
        log = json.load(f)
    step, epoch, batch = log["start"]
    assert 1 <= step <= steps["iter"] and epoch * 5 + batch == step
    order = [int(i) for i in grain.MapDataset.range(320).shuffle(seed=3)]
    b, at = data_script.BATCH, step % 5  # resumed after an epoch's last batch: the next one's first
    assert log["reads"][:b] == order[at * b : (at + 1) * b]
    consumed = (TOTAL - step) + 2  # the remaining steps, plus the 2 batches read ahead
    assert len(log["reads"]) <= consumed * b


def test_iterdataset_resumed_right_after_an_epochs_last_batch(tmp_path):
    """A checkpoint at the epoch's last batch holds an exhausted iterator state: the resume
    ends that epoch and goes on with the next one (the kill test hits this at steps 5 and 10)."""
    job = dict(kind="iter", dir=str(tmp_path / "ckpt"), every_n_steps=1)
    data_script.run({**job, "max_steps": 5})  # 5 batches an epoch: stops at the epoch's end
    out = str(tmp_path / "resumed.npz")
    data_script.run({**job, "max_steps": 7, "resume": "last", "out": out})
    ref = str(tmp_path / "ref.npz")
    data_script.run(dict(kind="iter", dir=str(tmp_path / "ref"), max_steps=7, out=ref))
    assert_bitwise(dict(np.load(out)), dict(np.load(ref)))
    with open(out + ".json") as f:
        log = json.load(f)
    assert log["start"] == [5, 0, 5]
    order = [int(i) for i in grain.MapDataset.range(320).shuffle(seed=3)]
    assert log["reads"][: data_script.BATCH] == order[: data_script.BATCH]  # epoch 1's first
