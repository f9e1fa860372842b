"""Time per optimizer update: fused accumulation (one `lax.scan` dispatch per update) vs
`optax.MultiSteps` (one dispatch per micro-batch), both through `Engine.fit` on one device.

    python benchmarks/accumulation.py [--k 8] [--batch-size 32] [--updates 40] [--hidden 1024]

Prints both timings and the ratio MultiSteps / fused (> 1: the fused scan is faster). Uses the
default device set (on CPU: 1 device unless XLA_FLAGS says otherwise); compile time excluded.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import Callback, GradientAccumulation


class Net(TrainModule):
    def __init__(self, rngs, features, hidden, classes, multi_steps):
        self.l1 = nnx.Linear(features, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.l3 = nnx.Linear(hidden, classes, rngs=rngs)
        self.multi_steps = multi_steps

    def training_step(self, batch):
        x, y = batch
        logits = self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def configure_optimizers(self):
        tx = optax.adam(1e-3)
        if self.multi_steps > 1:
            return optax.MultiSteps(tx, self.multi_steps).gradient_transformation()
        return tx


class UpdateTimer(Callback):
    """Wall time per optimizer update after `warmup` engine steps (compile and warm-up excluded)."""

    def __init__(self, warmup_steps: int, steps_per_update: int):
        self.warmup, self.per_update = warmup_steps, steps_per_update
        self.t0 = self.t1 = 0.0
        self.steps = 0

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if engine.global_step == self.warmup:
            jax.block_until_ready(engine.state)
            self.t0 = time.perf_counter()

    def on_fit_end(self, engine):
        jax.block_until_ready(engine.state)
        self.t1 = time.perf_counter()
        self.steps = engine.global_step - self.warmup

    @property
    def seconds_per_update(self) -> float:
        return (self.t1 - self.t0) / (self.steps / self.per_update)


def run(args, fused: bool) -> float:
    k, bs = args.k, args.batch_size
    rng = np.random.default_rng(0)
    n = bs * k * (args.updates + 2)
    x = rng.normal(size=(n, args.features)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    module = Net(nnx.Rngs(0), args.features, args.hidden, 10, 1 if fused else k)
    per_update = 1 if fused else k
    timer = UpdateTimer(warmup_steps=2 * per_update, steps_per_update=per_update)
    callbacks = [timer] + ([GradientAccumulation(k)] if fused else [])
    engine = Engine(
        strategy="single",
        max_steps=(args.updates + 2) * per_update,
        batch_size=bs,
        callbacks=callbacks,
        enable_progress_bar=False,
        logger=False,
        log_every_n_steps=10**6,
    )
    engine.fit(module, (x, y))
    return timer.seconds_per_update


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--k", type=int, default=8, help="micro-batches per optimizer update")
    p.add_argument("--batch-size", type=int, default=32, help="rows per micro-batch")
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()
    devices = jax.devices()
    print(f"device: {devices[0].platform} ({len(devices)} visible, strategy 'single')")
    fused = min(run(args, fused=True) for _ in range(2))
    multi = min(run(args, fused=False) for _ in range(2))
    print(f"k={args.k} micro-batches of {args.batch_size} rows per update")
    print(f"fused scan (1 dispatch/update):       {fused * 1e3:8.2f} ms/update")
    print(f"optax.MultiSteps ({args.k} dispatches/update): {multi * 1e3:8.2f} ms/update")
    print(f"ratio MultiSteps / fused: {multi / fused:.2f}x")


if __name__ == "__main__":
    main()
