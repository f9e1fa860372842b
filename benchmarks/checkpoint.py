"""Cost of checkpointing: steady-state steps/s with `ModelCheckpoint(every_n_steps=N)` vs without
checkpoints, printed as a ratio (target >= 0.95), plus how long one save blocks the loop vs how
long the whole (asynchronous) write takes.

Same MLP and optimizer (adam: the checkpoint is ~3x the parameters) as benchmarks/overhead.py.
This machine's speed drifts by 10-30% over seconds, so everything is measured in one run, and
locally: the fit is timed in windows of `--window` steps; a save's cost is the time of the
windows holding it and its background write, less the same number of clean windows (the median
of those around it, so slow drift cancels). "without" is the median rate of all clean windows;
"with" adds the mean save cost once per `--every` steps. An orbax save costs ~60-100 ms of
CPU here whatever the size (its threads compete with the step for 2 cores), so the ratio is a
function of how often you save; `--every` sets it (the default, 1000 steps, is a save every
~5 s here: far more often than training runs save). One CPU device.

    python benchmarks/checkpoint.py [--steps 10000] [--every 1000] [--hidden 512]
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
from meshfit.engine.checkpoint.writer import CheckpointWriter
from meshfit.engine.trees import tree_bytes


class Windows(Callback):
    """A timestamp every `size` steps after `warmup` (compilation, first saves' start-up)."""

    def __init__(self, size: int, warmup: int):
        self.size, self.warmup, self.stamps = size, warmup, []

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        done = engine.global_step - self.warmup
        if done >= 0 and done % self.size == 0:
            self.stamps.append(time.perf_counter())

    def on_fit_end(self, engine):
        self.stamps.append(time.perf_counter())  # after the loop waited for the last step


def run(args, data, root: str) -> tuple[Windows, ModelCheckpoint, Engine]:
    windows = Windows(args.window, args.warmup)
    # save_last=False: only the cadence saves are timed (no extra save at the end).
    mc = ModelCheckpoint(os.path.join(root, "ck"), every_n_steps=args.every, save_last=False)
    engine = Engine(
        "single",
        max_steps=args.warmup + args.steps,
        batch_size=args.batch,
        callbacks=[windows, mc],
        log_every_n_steps=100,
        enable_progress_bar=False,
        logger=False,
        default_root_dir=root,
    )
    sizes = [args.features, args.hidden, args.hidden, args.hidden, 10]
    engine.fit(MLP(sizes, nnx.Rngs(0)), data)
    return windows, mc, engine


def write_time(engine: Engine, root: str, repeats: int = 3) -> tuple[float, float]:
    """(blocking, total) seconds of one save of this engine's state, medians over `repeats`."""
    blocking, total = [], []
    for i in range(repeats):
        writer = CheckpointWriter(os.path.join(root, f"solo{i}"))
        t0 = time.perf_counter()
        writer.save(engine.global_step, *engine.checkpoint_state())
        blocking.append(time.perf_counter() - t0)
        writer.wait()
        total.append(time.perf_counter() - t0)
        writer.close()
    return statistics.median(blocking), statistics.median(total)


def save_costs(
    seconds: np.ndarray, saved: list[int], span: int, hit: int = 4
) -> tuple[list[float], list[float]]:
    """(extra seconds of each save, clean window times). A save lands in the window where its
    step falls and its background write in the next ones (`hit` windows in all; even, as every
    other window holds a metric read); each is compared with the median clean window within
    half a save interval of it. With saving off, the costs average ~0 (checked: -3 ms)."""
    touched = {k + i for k in saved for i in range(hit)}
    clean = [t for k, t in enumerate(seconds) if k not in touched]
    costs = []
    for k in saved:
        if k + hit > len(seconds):
            continue
        near = range(max(0, k - span // 2), min(len(seconds), k + hit + span // 2))
        reference = np.median([seconds[j] for j in near if j not in touched])
        costs.append(float(seconds[k : k + hit].sum() - hit * reference))
    return costs, clean


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--window", type=int, default=None, help="default: every / 10")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    args.window = args.window or max(1, args.every // 10)
    if args.every < 3 * args.window:
        parser.error("--every must be at least 3 windows, so some windows hold no save")
    rng = np.random.default_rng(0)
    n = args.batch * 50
    data = (
        rng.normal(size=(n, args.features)).astype(np.float32),
        rng.integers(0, 10, n).astype(np.int32),
    )
    with tempfile.TemporaryDirectory() as root:
        windows, mc, engine = run(args, data, root)
        solo_block, solo_total = write_time(engine, root)
        size = tree_bytes(engine.state)
    seconds = np.diff(windows.stamps)
    save_steps = range(args.every, args.warmup + args.steps + 1, args.every)
    saved = [(s - args.warmup) // args.window for s in save_steps if s >= args.warmup]
    costs, clean = save_costs(seconds, saved, span=args.every // args.window)
    without = args.window / np.median(clean)
    per_save = statistics.mean(costs)  # the mean: what the saves cost the run in total
    interval = args.every / without  # seconds of training between saves
    with_saves = args.every / (interval + per_save)
    saves = len(mc.save_blocking_s)
    print(f"state: {size / 2**20:.1f} MiB (params + adam moments); 1 CPU device")
    print(
        f"without checkpoints (median of {len(clean)} {args.window}-step windows without a "
        f"save): {without:8.1f} steps/s"
    )
    print(
        f"ModelCheckpoint(every_n_steps={args.every}), {saves} saves, one every "
        f"{interval:.1f} s: {with_saves:8.1f} steps/s"
    )
    print(f"ratio (checkpointing / none): {with_saves / without:.3f}  (target >= 0.95)")
    print(
        f"one save costs the loop {1e3 * per_save:.0f} ms in all (mean of {len(costs)}; median "
        f"{1e3 * statistics.median(costs):.0f} ms, quartiles {1e3 * np.percentile(costs, 25):.0f}-{1e3 * np.percentile(costs, 75):.0f} ms)"
        f"; it blocks the loop "
        f"{1e3 * statistics.median(mc.save_blocking_s):.1f} ms (median of {saves}); alone: "
        f"blocks {1e3 * solo_block:.1f} ms of a {1e3 * solo_total:.1f} ms total write"
    )


if __name__ == "__main__":
    main()
