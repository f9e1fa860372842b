"""meshfit `fit` vs a hand-written `jax.jit` loop: steady-state steps/s, printed as a ratio.

Both train the same MLP with the same optimizer on the same NumPy data fed from the host (a
per-epoch permutation, rows gathered and transferred every step); the baseline is a pure
jitted step with the state donated. meshfit runs with its default callbacks (progress bar,
TensorBoard logger). One device is configured, as single-device speed should be measured.

    python benchmarks/overhead.py [--steps 2000] [--repeats 3]
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


def handwritten(sizes, batch_size, steps):
    """The baseline: split once, pure step, jit with donation, host-fed batches."""
    module = MLP(sizes, nnx.Rngs(0))
    tx = module.configure_optimizers()
    graphdef, params = nnx.split(module, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    x, y = data()
    per_epoch = len(x) // batch_size

    def batches():
        epoch = 0
        while True:
            order = np.random.default_rng([0, epoch]).permutation(len(x))
            for i in range(per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                yield jax.device_put(x[idx]), jax.device_put(y[idx])
            epoch += 1

    it = batches()
    xb, yb = next(it)
    params, opt_state, loss = step(params, opt_state, xb, yb)  # compile + warm up
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(steps):
        xb, yb = next(it)
        params, opt_state, loss = step(params, opt_state, xb, yb)
    jax.block_until_ready((params, loss))
    return steps / (time.perf_counter() - start)


class FitTimer(Callback):
    """Times the loop only (compilation happens before on_fit_start)."""

    def on_fit_start(self, engine):
        self.start = time.perf_counter()

    def on_fit_end(self, engine):
        self.seconds = time.perf_counter() - self.start


def meshfit_fit(sizes, batch_size, steps, root):
    timer = FitTimer()
    engine = Engine(
        strategy="single",
        max_steps=steps,
        batch_size=batch_size,
        callbacks=[timer],
        default_root_dir=root,
    )
    # keep the progress bar on, but off the terminal
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        engine.fit(MLP(sizes, nnx.Rngs(0)), data())
    return steps / timer.seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000, help="steps per run, small MLP")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform} x {jax.device_count()}")
    cases = (((784, 256, 256, 10), 64, args.steps), ((784, 1024, 1024, 10), 256, args.steps // 6))
    with tempfile.TemporaryDirectory() as root:
        for sizes, batch_size, steps in cases:
            base, ours = [], []
            for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
                base.append(handwritten(sizes, batch_size, steps))
                ours.append(meshfit_fit(sizes, batch_size, steps, root))
            b, m = statistics.median(base), statistics.median(ours)
            name = "-".join(map(str, sizes))
            print(
                f"MLP {name} batch {batch_size}: hand-written {b:8.1f} steps/s | "
                f"meshfit {m:8.1f} steps/s | ratio {m / b:.3f} (medians of {args.repeats})"
            )


if __name__ == "__main__":
    main()
