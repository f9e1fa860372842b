"""Cost of checkpointing: steady-state steps/s with `ModelCheckpoint(every_n_steps=N)` saving often
vs the same fit without checkpoints, printed as a ratio (target >= 0.95), plus how long one save
blocks the loop vs how long the whole (asynchronous) write takes.

Same MLP, optimizer (adam: the checkpoint is ~3x the parameters) and data in both runs; timing
starts after a warm-up so compilation is excluded; each configuration is repeated and the best
run kept. One CPU device is configured.

    python benchmarks/checkpoint.py [--steps 1000] [--every 100] [--hidden 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
)

import numpy as np
from flax import nnx
from overhead import MLP  # the same model as the overhead benchmark (benchmarks/ is on sys.path)

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from meshfit.checkpoint import CheckpointWriter
from meshfit.state import tree_bytes


class Clock(Callback):
    """Wall time from the end of step `warmup` to the end of the fit (all steps dispatched+done)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if engine.global_step == self.warmup:
            self.t0 = time.perf_counter()

    def on_fit_end(self, engine):
        self.t1 = time.perf_counter()  # after the loop blocked on the final state


def run(args, data, checkpoint: bool, root: str) -> tuple[float, list[float], Engine]:
    clock = Clock(args.warmup)
    callbacks: list[Callback] = [clock]
    mc = None
    if checkpoint:
        # save_last=False: only the cadence saves are timed (no extra save at the end).
        mc = ModelCheckpoint(os.path.join(root, "ck"), every_n_steps=args.every, save_last=False)
        callbacks.append(mc)
    engine = Engine(
        "single",
        max_steps=args.steps,
        batch_size=args.batch,
        callbacks=callbacks,
        log_every_n_steps=100,
        enable_progress_bar=False,
        logger=False,
        default_root_dir=root,
    )
    sizes = [args.features, args.hidden, args.hidden, args.hidden, 10]
    engine.fit(MLP(sizes, nnx.Rngs(0)), data)
    steps_per_s = (args.steps - args.warmup) / (clock.t1 - clock.t0)
    return steps_per_s, (mc.save_blocking_s if mc else []), engine


def write_time(engine: Engine, root: str, repeats: int = 3) -> tuple[float, float]:
    """(blocking, total) seconds of one save of this engine's state, medians over `repeats`."""
    blocking, total = [], []
    for i in range(repeats):
        writer = CheckpointWriter(os.path.join(root, f"solo{i}"))
        t0 = time.perf_counter()
        writer.save(engine)
        blocking.append(time.perf_counter() - t0)
        writer.wait()
        total.append(time.perf_counter() - t0)
        writer.close()
    return statistics.median(blocking), statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.batch * 50
    data = (
        rng.normal(size=(n, args.features)).astype(np.float32),
        rng.integers(0, 10, n).astype(np.int32),
    )
    base, ckpt, blocking = [], [], []
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):  # interleaved, so drifting machine load hits both
            base.append(run(args, data, False, os.path.join(root, f"b{r}"))[0])
            speed, saves, engine = run(args, data, True, os.path.join(root, f"c{r}"))
            ckpt.append(speed)
            blocking += saves
        solo_block, solo_total = write_time(engine, root)
        size = tree_bytes(engine.state)
    saves = len(blocking) // args.repeats
    print(f"state: {size / 2**20:.1f} MiB (params + adam moments); 1 CPU device")
    print(f"without checkpoints: {max(base):8.1f} steps/s")
    print(
        f"ModelCheckpoint(every_n_steps={args.every}), {saves} saves/run: {max(ckpt):8.1f} steps/s"
    )
    print(f"ratio (checkpointing / none): {max(ckpt) / max(base):.3f}  (target >= 0.95)")
    print(
        f"one save blocks the loop {1e3 * statistics.median(blocking):.1f} ms (median of "
        f"{len(blocking)} in-loop saves); alone: blocks {1e3 * solo_block:.1f} ms of a "
        f"{1e3 * solo_total:.1f} ms total write"
    )


if __name__ == "__main__":
    main()
