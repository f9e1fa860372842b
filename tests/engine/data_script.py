"""Child process for the data-pipeline resume tests: train from a grain pipeline, optionally
resuming, and save the parameters and what the source read.

    python data_script.py '[{"kind": "source" | "iter", "out": "a.npz", "dir": CKPT,
                             "max_steps": 12, "resume": "last", "every_n_steps": 1}, ...]'

`source`: a grain MapDataset (record source + random_map) read by 2 worker processes.
`iter`: a grain IterDataset (shuffle, random_map, batch) whose iterator state is checkpointed.
Prints `step N` after every step (flushed) so the parent can kill it at a chosen step.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import grain
import jax
import numpy as np
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from tests.engine.data_models import augment, records
from tests.models import MLP

BATCH = 64


def pipeline(kind: str):
    """(train_data, the counting source, data_workers) for `kind`."""
    source = records(n=320)  # 5 batches of 64 per epoch
    if kind == "source":
        return grain.MapDataset.source(source).random_map(augment, seed=7), source, 2
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=3)
        .random_map(augment, seed=5)
        .to_iter_dataset(grain.ReadOptions(num_threads=0))  # reads only what is consumed
        .batch(BATCH, drop_remainder=True)
    )
    return ds, source, 0


class Announce(Callback):
    """Reports each step; records where the run started and how much was read before it."""

    def __init__(self, source, sleep):
        self.source, self.sleep, self.start = source, sleep, None

    def on_fit_start(self, engine):
        self.start = [engine.global_step, engine.current_epoch, engine.batch_idx]

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if self.sleep:
            time.sleep(self.sleep)
        print(f"step {engine.global_step}", flush=True)


def run(job: dict) -> Engine:
    job = {**DEFAULTS, **job}
    data, source, workers = pipeline(job["kind"])
    announce = Announce(source, job["sleep"])
    engine = Engine(
        strategy="dp",
        max_steps=job["max_steps"],
        batch_size=BATCH,
        log_every_n_steps=3,
        enable_progress_bar=False,
        logger=False,
        data_workers=workers,
        callbacks=[
            ModelCheckpoint(dirpath=job["dir"], every_n_steps=job["every_n_steps"]),
            announce,
        ],
    )
    module = MLP(nnx.Rngs(0))
    engine.fit(module, data, ckpt_path=job["resume"])
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    if job["out"]:
        arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(leaves)}
        loss = engine.callback_metrics.get("loss", np.nan)
        np.savez(job["out"], step=engine.global_step, loss=loss, **arrays)
        with open(job["out"] + ".json", "w") as f:
            json.dump({"start": announce.start, "reads": source.reads}, f)
    print(f"done {engine.global_step}", flush=True)
    return engine


DEFAULTS = dict(
    kind="source", out=None, dir=None, max_steps=12, resume=None, every_n_steps=None, sleep=0.0
)

if __name__ == "__main__":
    for job in json.loads(sys.argv[1]):
        run(job)
