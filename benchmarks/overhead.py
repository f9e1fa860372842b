"""meshfit `fit` vs hand-written `jax.jit` loops: steady-state optimizer steps/s, as ratios.

Whole `fit` calls over several epochs of shuffled NumPy data (meshfit's normal path, default
callbacks on: progress bar to a file, TensorBoard, NaN guard) against two hand-written loops
measured in the same process:

  (a) the limit: pure `jax.jit`, donated state, every batch already on the device, one step
      per call;
  (b) the same fed a shuffled NumPy batch each step (gathered and `device_put` per step);
  (c) for reference, a hand-written fused loop: the data on the device, `lax.scan` over up to
      128 steps per call, each step's rows gathered through the epoch's permutation on the
      device (what "auto" does, without metrics, hooks or the NaN guard).

Each configuration runs a short and a long fit (or loop) from a fresh start; the steady state
is (long - short) time over (long - short) steps, so start-up cancels (a persistent compilation
cache makes every repeat after the first load its programs rather than compile them). The
lengths are set per workload so that the steady part of the fastest runner takes a good part
of a second: a whole fit's start-up varies by tens of ms, which must not decide the figure.
One unmeasured run of each configuration fills the compilation cache first. Repeats
interleave every configuration, in reversed order every other round (a run must not
always follow the same one), each after a garbage collection, and each configuration keeps
its best time (on a shared machine drift only adds time). One CPU device is configured.

    python benchmarks/overhead.py [--repeats 3] [--scale 1.0] [--only 64]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import ProgressBar
from meshfit.engine.data.arrays import epoch_order

# Every fit builds its programs anew; with this cache a repeat loads them instead of compiling,
# so the long and short runs cost the same start-up (a long run may need more dispatch sizes).
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="overhead-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

WORKLOADS = {  # name: (layer sizes, batch size, rows, (short, long) epochs)
    "64-32-10": ((64, 32, 10), 32, 32768, (2, 40)),
    "784-256-256-10": ((784, 256, 256, 10), 64, 16384, (2, 16)),
    "784-1024-1024-10": ((784, 1024, 1024, 10), 256, 8192, (2, 10)),
}


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


def make_data(sizes, rows):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, sizes[0])).astype(np.float32)
    return x, rng.integers(0, sizes[-1], rows).astype(np.int32)


def plain_step(sizes):
    """(step, params, opt_state) for the same model and optimizer; the step is unjitted (the
    loops below jit it, or trace it inside their scan)."""
    module = MLP(sizes, nnx.Rngs(0))
    tx = module.configure_optimizers()
    graphdef, params = nnx.split(module, nnx.Param)

    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, tx.init(params)


def hand_written_step(sizes):
    """(jitted donated step, params, opt_state)."""
    step, params, opt = plain_step(sizes)
    return jax.jit(step, donate_argnums=(0, 1)), params, opt


def orders(rows, batch, epochs):
    for epoch in range(epochs):
        order = epoch_order(rows, 0, epoch, shuffle=True)  # meshfit's own (seed 0)
        for i in range(rows // batch):
            yield order[i * batch : (i + 1) * batch]


def run_limit(sizes, batch, data, epochs):
    """(a): every batch placed before the clock starts; one jitted step per call."""
    x, y = data
    placed = [jax.device_put((x[i], y[i])) for i in orders(len(x), batch, epochs)]
    jax.block_until_ready(placed)
    step, params, opt = hand_written_step(sizes)
    start = time.perf_counter()
    for xb, yb in placed:
        params, opt, loss = step(params, opt, xb, yb)
    jax.block_until_ready((params, loss))
    return time.perf_counter() - start


def hand_written_scan(sizes, batch):
    """(jitted donated K-step call, params, opt_state): step j of a call takes the rows
    perm[(start + j) * batch : ...] of the device-resident data."""
    step, params, opt = plain_step(sizes)

    def fused(params, opt, x, y, perm, start, k):
        def body(carry, j):
            idx = jax.lax.dynamic_slice(perm, ((start + j) * batch,), (batch,))
            params, opt, loss = step(*carry, x[idx], y[idx])
            return (params, opt), loss

        (params, opt), losses = jax.lax.scan(body, (params, opt), jnp.arange(k))
        return params, opt, losses[-1]

    return jax.jit(fused, donate_argnums=(0, 1), static_argnums=6), params, opt


def run_scan(sizes, batch, data, epochs):
    """(c): data on the device, up to 128 steps per call, the permutation gathered inside."""
    x, y = jax.device_put(data)
    rows = len(data[0])
    per_epoch = rows // batch
    fused, params, opt = hand_written_scan(sizes, batch)
    jax.block_until_ready((x, y))
    start = time.perf_counter()
    for epoch in range(epochs):
        perm = jax.device_put(epoch_order(rows, 0, epoch, shuffle=True).astype(np.int32))
        for first in range(0, per_epoch, 128):  # a shorter last call for a remainder
            k = min(128, per_epoch - first)
            params, opt, loss = fused(params, opt, x, y, perm, np.int32(first), k)
    jax.block_until_ready((params, loss))
    return time.perf_counter() - start


def run_fed(sizes, batch, data, epochs):
    """(b): a shuffled NumPy batch gathered and transferred each step."""
    x, y = data
    step, params, opt = hand_written_step(sizes)
    start = time.perf_counter()
    for i in orders(len(x), batch, epochs):
        params, opt, loss = step(params, opt, jax.device_put(x[i]), jax.device_put(y[i]))
    jax.block_until_ready((params, loss))
    return time.perf_counter() - start


def run_meshfit(sizes, batch, data, epochs, spd, root):
    """A whole `fit` with the default callbacks (the progress bar writes to a file)."""
    with open(os.path.join(root, "progress.txt"), "w") as bar_file:
        engine = Engine(
            strategy="single",
            max_epochs=epochs,
            batch_size=batch,
            steps_per_dispatch=spd,
            callbacks=[ProgressBar(file=bar_file)],
            default_root_dir=root,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        engine.fit(MLP(sizes, nnx.Rngs(0)), data)
        return time.perf_counter() - start


RUNNERS = {
    "limit (a)": lambda s, b, d, e, root: run_limit(s, b, d, e),
    "fed (b)": lambda s, b, d, e, root: run_fed(s, b, d, e),
    "scan (c)": lambda s, b, d, e, root: run_scan(s, b, d, e),
    "meshfit spd=1": lambda s, b, d, e, root: run_meshfit(s, b, d, e, 1, root),
    "meshfit auto": lambda s, b, d, e, root: run_meshfit(s, b, d, e, "auto", root),
}


def measure(name, repeats, scale, root):
    """Steady-state steps/s per runner: best-of-N long minus best-of-N short."""
    sizes, batch, rows, (short, long) = WORKLOADS[name]
    long = max(short + 1, round(long * scale))
    data = make_data(sizes, rows)
    for run in RUNNERS.values():  # unmeasured: compiles once, so every measured run loads
        run(sizes, batch, data, short, root)  # its programs
    best = {(r, e): float("inf") for r in RUNNERS for e in (short, long)}
    for round_ in range(repeats):  # interleaved: every runner and length in each round
        for runner, epochs in list(best)[:: -1 if round_ % 2 else 1]:
            gc.collect()
            took = RUNNERS[runner](sizes, batch, data, epochs, root)
            best[runner, epochs] = min(best[runner, epochs], took)
    steps = (long - short) * (rows // batch)
    rates = {}
    for r in RUNNERS:
        steady = best[r, long] - best[r, short]
        if steady <= 0:
            raise SystemExit(
                f"{name}, {r}: the {long}-epoch run took no longer than the {short}-epoch one "
                f"({best[r, long]:.3f} s vs {best[r, short]:.3f} s): noise decided. Use a "
                "larger --scale or more --repeats."
            )
        rates[r] = steps / steady
    return rates


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="best of N per configuration")
    parser.add_argument("--scale", type=float, default=1.0, help="long runs' epochs times this")
    parser.add_argument("--only", default=None, help="workloads whose name starts with this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for name in WORKLOADS:
            if args.only and not name.startswith(args.only):
                continue
            rates = measure(name, args.repeats, args.scale, root)
            a, b, c = rates["limit (a)"], rates["fed (b)"], rates["scan (c)"]
            print(
                f"MLP {name} batch {WORKLOADS[name][1]}: limit (a) {a:.0f} steps/s, "
                f"fed (b) {b:.0f}, scan (c) {c:.0f} (/ (a) {c / a:.2f})"
            )
            for runner in ("meshfit spd=1", "meshfit auto"):
                r = rates[runner]
                print(
                    f"  {runner:14s} {r:8.0f} steps/s   / (a) {r / a:.2f}   / (b) {r / b:.2f}"
                    f"   / (c) {r / c:.2f}"
                )


if __name__ == "__main__":
    main()
