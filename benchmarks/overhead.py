"""meshfit `fit` vs a hand-written `jax.jit` loop: steady-state steps/s, printed as a ratio.

Both train the same MLP with the same optimizer on the same NumPy data fed from the host (a
per-epoch permutation, rows gathered and transferred every step); the baseline is a pure
jitted step with the state donated. meshfit runs with its default callbacks (progress bar,
TensorBoard logger, NaN guard). One device is configured, as single-device speed should be
measured.

This machine's speed drifts by 10-30% over seconds, more than the difference being measured,
so the two loops alternate within one run: every `--segment` steps of the meshfit fit, a
callback waits for the device, then runs the same number of hand-written steps (compiled
beforehand) and restarts meshfit's clock. Each printed rate is total steps / total time over
all segments; the ratio is the median of the segments' paired ratios.

    python benchmarks/overhead.py [--segments 60]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
)

import jax
import numpy as np
import optax
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import Callback


class MLP(TrainModule):
    def __init__(self, sizes, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)

    def training_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def configure_optimizers(self):
        return optax.adam(1e-3)


def data(n=8192, features=784, classes=10):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, features)).astype(np.float32), rng.integers(0, classes, n).astype(
        np.int32
    )


class HandWritten:
    """The baseline: split once, pure step, jit with donation, host-fed batches."""

    def __init__(self, sizes, batch_size):
        module = MLP(sizes, nnx.Rngs(0))
        tx = module.configure_optimizers()
        graphdef, params = nnx.split(module, nnx.Param)

        def step(params, opt_state, x, y):
            def loss_fn(p):
                m = nnx.merge(graphdef, p)
                return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params, self.opt_state = params, tx.init(params)
        self.batches = self._batches(*data(), batch_size)
        self.run(3)  # compile + warm up

    @staticmethod
    def _batches(x, y, batch_size):
        for epoch in itertools.count():
            order = np.random.default_rng([0, epoch]).permutation(len(x))
            for i in range(len(x) // batch_size):
                idx = order[i * batch_size : (i + 1) * batch_size]
                yield jax.device_put(x[idx]), jax.device_put(y[idx])

    def run(self, steps):
        """`steps` steps from an idle device to their end; returns the elapsed seconds."""
        start = time.perf_counter()
        for _ in range(steps):
            xb, yb = next(self.batches)
            self.params, self.opt_state, loss = self.step(self.params, self.opt_state, xb, yb)
        jax.block_until_ready((self.params, loss))
        return time.perf_counter() - start


class Alternate(Callback):
    """Every `segment` steps (after `warmup`): wait for meshfit's steps, record their time, run
    `segment` baseline steps, restart meshfit's clock. The fit's own work stays untouched."""

    def __init__(self, baseline, segment, warmup):
        self.baseline, self.segment, self.warmup = baseline, segment, warmup
        self.ours, self.theirs = [], []  # seconds per segment
        self.start = None

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        done = engine.global_step - self.warmup
        if done < 0 or done % self.segment:
            return
        jax.block_until_ready(outputs)  # every step so far has finished
        end = time.perf_counter()
        took = self.baseline.run(self.segment)
        if self.start is not None:  # the first baseline segment only warms up (cold caches)
            self.ours.append(end - self.start)
            self.theirs.append(took)
        self.start = time.perf_counter()


def compare(sizes, batch_size, segment, segments, root, warmup=20, **engine_kwargs):
    """(hand-written steps/s, meshfit steps/s, median paired ratio) over `segments` pairs."""
    alternate = Alternate(HandWritten(sizes, batch_size), segment, warmup)
    engine = Engine(
        strategy="single",
        max_steps=warmup + segment * segments,
        batch_size=batch_size,
        callbacks=[alternate],
        default_root_dir=root,
        **engine_kwargs,
    )
    # keep the progress bar on, but off the terminal
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        engine.fit(MLP(sizes, nnx.Rngs(0)), data())
    ours, theirs = alternate.ours, alternate.theirs
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    n = segment * len(ours)
    return n / sum(theirs), n / sum(ours), statistics.median(ratios)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--segments", type=int, default=60, help="alternations per case")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform} x {jax.device_count()}")
    # segments: multiples of log_every_n_steps (50), so each holds the same metric reads
    cases = (((784, 256, 256, 10), 64, 200), ((784, 1024, 1024, 10), 256, 50))
    with tempfile.TemporaryDirectory() as root:
        for sizes, batch_size, segment in cases:
            b, m, ratio = compare(sizes, batch_size, segment, args.segments, root)
            name = "-".join(map(str, sizes))
            print(
                f"MLP {name} batch {batch_size}: hand-written {b:8.1f} steps/s | "
                f"meshfit {m:8.1f} steps/s | ratio {ratio:.3f} "
                f"(median of {args.segments} alternating {segment}-step segments)"
            )


if __name__ == "__main__":
    main()
