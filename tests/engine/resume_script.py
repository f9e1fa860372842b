"""Child process for the resume tests: train a tiny MLP, optionally resuming, and save params.

    python resume_script.py '[{"out": "a.npz", "strategy": "dp", "max_steps": 12,
                               "dir": CKPT, "resume": "last", "every_n_steps": 2}, ...]'

Several jobs run in one process (one interpreter start-up for all of them).

Prints `step N` after every step (flushed) so the parent can send a signal at a chosen step.
Exits with meshfit.PREEMPTED_EXIT_CODE after a SIGTERM/SIGUSR1 (the engine handles it).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from tests.models import MLP, classification_data


class Announce(Callback):
    """Tells the parent how far training got; optionally slows steps so a signal lands mid-run."""

    def __init__(self, sleep: float):
        self.sleep = sleep

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if self.sleep:
            time.sleep(self.sleep)
        print(f"step {engine.global_step}", flush=True)


def run(job: dict) -> Engine:
    """Train per `job` (keys of DEFAULTS); write params, final step and last logged loss."""
    job = {**DEFAULTS, **job}
    data = classification_data(n=320)  # 5 batches of 64: saves fall mid-epoch
    module = MLP(nnx.Rngs(0))
    engine = Engine(
        strategy=job["strategy"],
        devices=job["devices"],
        max_steps=job["max_steps"],
        batch_size=64,
        log_every_n_steps=3,
        enable_progress_bar=False,
        logger=False,
        callbacks=[
            ModelCheckpoint(dirpath=job["dir"], every_n_steps=job["every_n_steps"]),
            Announce(job["sleep"]),
        ],
    )
    engine.fit(module, data, ckpt_path=job["resume"])
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    loss = engine.callback_metrics.get("loss", np.nan)
    arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(leaves)}
    if job["out"]:
        np.savez(job["out"], step=engine.global_step, loss=loss, **arrays)
    print(f"done {engine.global_step}", flush=True)
    return engine


DEFAULTS = dict(
    out=None, strategy="dp", devices=None, max_steps=12, dir=None, resume=None,
    every_n_steps=None, sleep=0.0,
)  # fmt: skip


if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        run(job)
