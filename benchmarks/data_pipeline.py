"""Input pipeline vs step: rows/s the on-disk digits pipeline delivers, against rows/s the
compiled training step consumes, printed as a ratio (> 1: the input keeps up).

    python benchmarks/data_pipeline.py [--workers 2] [--batch 64] [--rounds 3]

Pipeline: `examples/digits_on_disk.py`'s ArrayRecord files read through meshfit's
SourceLoader (grain workers, decode + random augmentation, shuffled batches), with no step
running. Step: `Engine.fit` of the example's classifier on the same rows as NumPy arrays in
memory (no reading cost), timed from its 20th step to the end. The two alternate for
`--rounds` rounds; each figure is the best round (the machine is shared, so noise only slows).
One CPU device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from digits_on_disk import Classifier, decode, pipeline, write_digits

from meshfit import Engine
from meshfit.callbacks import Callback
from meshfit.engine.data import make_loader


def pipeline_rows_per_s(path: str, batch: int, workers: int, epochs: int) -> float:
    loader = make_loader(pipeline(path, True), batch, train=True, seed=0, process_count=1,
                         name="train_data", workers=workers)  # fmt: skip
    next(loader.epoch(0))  # start the workers before timing
    t0, rows = time.perf_counter(), 0
    for epoch in range(epochs):
        for b in loader.epoch(epoch, 1 if epoch == 0 else 0):
            rows += len(b.local[1])
    seconds = time.perf_counter() - t0
    loader.close()
    return rows / seconds


class StepClock(Callback):
    def __init__(self, skip: int):
        self.skip, self.t0, self.steps = skip, None, 0

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if engine.global_step == self.skip:
            jax.block_until_ready(outputs)
            self.t0 = time.perf_counter()
        elif engine.global_step > self.skip:
            self.steps += 1

    def on_fit_end(self, engine):
        jax.block_until_ready(engine.state)
        self.seconds = time.perf_counter() - self.t0


def step_rows_per_s(arrays, batch: int, steps: int) -> float:
    clock = StepClock(skip=20)
    engine = Engine(strategy="single", max_steps=steps + 20, batch_size=batch,
                    enable_progress_bar=False, logger=False, enable_model_summary=False,
                    callbacks=[clock])  # fmt: skip
    engine.fit(Classifier(nnx.Rngs(0)), arrays)
    return clock.steps * batch / clock.seconds


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4, help="pipeline epochs per round")
    p.add_argument("--steps", type=int, default=400, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    train_path, _ = write_digits(os.path.join(tempfile.gettempdir(), "meshfit-digits-disk"))
    from grain.sources import ArrayRecordDataSource

    source = ArrayRecordDataSource(train_path)
    x, y = (np.stack(c) for c in zip(*(decode(source[i]) for i in range(len(source)))))
    delivered, consumed = [], []
    for _ in range(args.rounds):
        delivered.append(pipeline_rows_per_s(train_path, args.batch, args.workers, args.epochs))
        consumed.append(step_rows_per_s((x, y), args.batch, args.steps))
        print(f"round: pipeline {delivered[-1]:,.0f} rows/s, step {consumed[-1]:,.0f} rows/s")
    best_in, best_step = max(delivered), max(consumed)
    print(f"pipeline ({args.workers} workers): {best_in:,.0f} rows/s (best of {args.rounds})")
    print(f"step consumes:           {best_step:,.0f} rows/s (best of {args.rounds})")
    print(f"ratio pipeline / step:   {best_in / best_step:.2f}")


if __name__ == "__main__":
    main()
