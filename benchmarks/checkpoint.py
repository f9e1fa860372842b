"""Cost of checkpointing, measured as whole fits: throughput with `ModelCheckpoint(every_n_steps=N)`
against the same fit without checkpoints, printed as a ratio (target >= 0.95).

MLP 784-256-256-10, adam (the state is ~3x the parameters: 3.1 MiB), batch 64, one CPU device,
no progress bar or logger, default fused dispatch. Each fit is timed from the end of its first
step (compiled, and waited for) to the return of `fit`, so the final save at the end of fit and
the wait for its background write are included. One unmeasured fit of each kind first fills a
shared persistent compilation cache, so the measured fits load every dispatch size instead of
compiling it. This machine's speed drifts by 10-30% over seconds, so the two kinds of fit
alternate (ABBA order) and the ratio is best-of-N with vs best-of-N without; the median of the
N paired ratios is printed too. As the machine may be shared, the CPU time each fit used is
measured as well (all threads, `getrusage`): the extra CPU seconds per save do not depend on
what else runs. Then a breakdown per save: how long `save` blocks the loop (in the fits), and
one save of the same state alone, blocking vs total write.

    python benchmarks/checkpoint.py [--steps 6000] [--every 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
)

import jax
from flax import nnx
from overhead import MLP, make_data  # the same model and data as benchmarks/overhead.py

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from meshfit.engine.checkpoint.writer import CheckpointWriter
from meshfit.engine.trees import tree_bytes


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock(Callback):
    """Starts timing when the first step is done (compilation and first dispatch excluded). It
    asks for that step alone (`next_host_step`), and is fusion-safe, so the rest of the fit runs
    fused as by default (a callback that is not makes every fit one step per dispatch)."""

    fusion_safe = True

    def __init__(self):
        self.start: float | None = None
        self.cpu_start = 0.0
        self.start_step = 0

    def next_host_step(self, engine):
        return 1 if self.start is None else None

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if self.start is None:
            jax.block_until_ready(dict(outputs))
            self.start, self.cpu_start = time.perf_counter(), cpu_seconds()
            self.start_step = engine.global_step


def fit(args, train, root: str, every: int | None, cache: str) -> tuple[float, float, Any, Engine]:
    """(steps/s, CPU seconds) of one whole fit after its first step, its ModelCheckpoint (when
    `every`) and the engine."""
    clock = Clock()
    mc = ModelCheckpoint(os.path.join(root, "ck"), every_n_steps=every) if every else None
    engine = Engine(
        "single",
        max_steps=args.steps,
        batch_size=args.batch,
        callbacks=[clock] + ([mc] if mc else []),
        log_every_n_steps=100,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        compilation_cache_dir=cache,  # shared: every dispatch size is compiled once
        default_root_dir=root,
    )
    engine.fit(MLP([int(n) for n in args.sizes.split(",")], nnx.Rngs(0)), train)
    seconds, cpu = time.perf_counter() - clock.start, cpu_seconds() - clock.cpu_start
    return (args.steps - clock.start_step) / seconds, cpu, mc, engine


def solo_save(engine: Engine, root: str, repeats: int = 3) -> tuple[float, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="784,256,256,10", help="MLP layer widths")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    train = make_data([int(n) for n in args.sizes.split(",")], rows=8192)
    rates: dict[str, list[float]] = {"none": [], "ckpt": []}
    cpus: dict[str, list[float]] = {"none": [], "ckpt": []}
    blocking: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        cache = os.path.join(root, "jax_cache")
        for kind in ("none", "ckpt"):  # warm-up, not measured: fills the compilation cache
            fit(
                args,
                train,
                os.path.join(root, f"warm-{kind}"),
                args.every if kind == "ckpt" else None,
                cache,
            )
        for r in range(args.repeats):
            order = ("none", "ckpt") if r % 2 == 0 else ("ckpt", "none")  # ABBA
            for kind in order:
                run_root = os.path.join(root, f"{kind}{r}")
                rate, cpu, mc, engine = fit(
                    args, train, run_root, args.every if kind == "ckpt" else None, cache
                )
                rates[kind].append(rate)
                cpus[kind].append(cpu)
                if mc is not None:
                    blocking += mc.save_blocking_s
                    saves = len(mc.save_blocking_s)
            print(
                f"repeat {r}: none {rates['none'][-1]:7.1f} steps/s ({cpus['none'][-1]:.1f} CPU s)"
                f", ckpt {rates['ckpt'][-1]:7.1f} steps/s ({cpus['ckpt'][-1]:.1f} CPU s)",
                flush=True,
            )
        solo_block, solo_total = solo_save(engine, root)
        size = tree_bytes(engine.state)
    best = max(rates["ckpt"]) / max(rates["none"])
    paired = statistics.median(c / n for c, n in zip(rates["ckpt"], rates["none"]))
    print(
        f"state: {size / 2**20:.1f} MiB (params + adam moments); 1 CPU device; {args.steps} steps"
    )
    print(f"without checkpoints (best of {args.repeats}): {max(rates['none']):8.1f} steps/s")
    print(
        f"ModelCheckpoint(every_n_steps={args.every}), {saves} saves per fit incl. the final "
        f"one (best of {args.repeats}): {max(rates['ckpt']):8.1f} steps/s"
    )
    print(f"ratio (checkpointing / none, best of {args.repeats}): {best:.3f}  (target >= 0.95)")
    print(f"median of the {args.repeats} paired ratios: {paired:.3f}")
    extra = (statistics.median(cpus["ckpt"]) - statistics.median(cpus["none"])) / saves
    cpu_ratio = statistics.median(cpus["none"]) / statistics.median(cpus["ckpt"])
    print(
        f"CPU time: {statistics.median(cpus['none']):.2f} s per fit without, "
        f"{statistics.median(cpus['ckpt']):.2f} s with (medians): {1e3 * extra:.0f} ms of CPU "
        f"per save; CPU-time ratio {cpu_ratio:.3f}"
    )
    print(
        f"a save blocks the loop {1e3 * statistics.median(blocking):.1f} ms (median of "
        f"{len(blocking)}); alone, one save blocks {1e3 * solo_block:.1f} ms of a "
        f"{1e3 * solo_total:.1f} ms total write"
    )


if __name__ == "__main__":
    main()
