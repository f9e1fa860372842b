"""The cost of logging to four loggers at once (TensorBoard, CSV, W&B offline, MLflow file
store) against the default logger (TensorBoard alone), on training steps/s. One CPU device.

Both train the same MLP with a validation set and the default progress bar (to /dev/null).
This machine's speed drifts by 10-30% over seconds, so the cases alternate, two ways:

- `fits`: whole fits, default and four loggers alternating (A B, B A, ...); the loop's rate
  is steps / seconds from the first batch to the end of the last step (compiling and what a
  logger does once per fit, e.g. W&B starting its service, are printed apart). The ratio is
  best fit over best fit, plus the median of the paired ratios.
- `segments`: one fit with the four loggers, where CSV, W&B and MLflow drop what they are
  given in every other segment of `--segment` steps (boundaries between logs, each segment
  holding the same logs and one validation): each segment with the three is compared with the
  mean of its two neighbours without, and the median ratio isolates their per-step cost.

    python benchmarks/loggers.py [--mode both] [--rounds 7] [--segments 40]
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
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true")

import jax
import numpy as np
import optax
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import (
    Callback,
    CSVLogger,
    MLflowLogger,
    TensorBoardLogger,
    WandbLogger,
)


class MLP(TrainModule):
    def __init__(self, sizes, rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        self.log("acc", (logits.argmax(-1) == y).mean(), prog_bar=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def validation_step(self, batch):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).mean())

    def configure_optimizers(self):
        return optax.adam(1e-3)


def data(n, features=784, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int32)


def four_loggers(root):
    return [
        TensorBoardLogger(),
        CSVLogger(),
        WandbLogger(project="meshfit-bench", offline=True, dir=root),
        MLflowLogger(tracking_uri="file:" + os.path.join(root, "mlruns")),
    ]


def run_fit(loggers, callbacks, root, steps, log_every, val_every=None):
    engine = Engine(
        strategy="single",
        max_steps=steps,
        batch_size=64,
        log_every_n_steps=log_every,
        val_every_n_steps=val_every,
        default_root_dir=root,
        enable_model_summary=False,
        logger=loggers,
        callbacks=callbacks,
    )
    with (
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stderr(devnull),
        contextlib.redirect_stdout(devnull),
    ):
        engine.fit(MLP((784, 256, 256, 10), nnx.Rngs(0)), data(8192), data(1024, seed=1))


# ---------------------------------------------------------------------------- whole fits
class LoopClock(Callback):
    """Seconds from the first batch to the end of the last step (before the fit's end hooks)."""

    def on_train_batch_start(self, engine, batch, batch_idx):
        if engine.global_step == 0:
            self.start = time.perf_counter()

    def on_fit_end(self, engine):
        jax.block_until_ready(engine.state)
        self.seconds = time.perf_counter() - self.start


def time_hooks(loggers):
    """Wrap the loggers' in-loop hooks (instance attributes, which the engine calls); the CPU
    seconds of the calling thread in them (robust to other processes' load) add up in the
    returned list."""
    spent = [0.0]

    def timed(fn):
        def wrapper(*args):
            t0 = time.thread_time()
            fn(*args)
            spent[0] += time.thread_time() - t0

        return wrapper

    for logger in loggers:
        for hook in ("on_log", "on_train_batch_end", "on_validation_end", "on_train_epoch_end"):
            setattr(logger, hook, timed(getattr(logger, hook)))
    return spent


def whole_fits(root, rounds, steps, log_every):
    rates, outside, hooks = ({"default": [], "four": []} for _ in range(3))
    for i in range(rounds):
        for kind in ("default", "four") if i % 2 == 0 else ("four", "default"):
            loggers = [TensorBoardLogger()] if kind == "default" else four_loggers(root)
            spent, clock = time_hooks(loggers), LoopClock()
            start = time.perf_counter()
            run_fit(loggers, [clock], root, steps, log_every)
            rates[kind].append(steps / clock.seconds)
            outside[kind].append(time.perf_counter() - start - clock.seconds)
            hooks[kind].append(spent[0] / steps)
    best_d, best_f = max(rates["default"]), max(rates["four"])
    paired = [f / d for d, f in zip(rates["default"], rates["four"])]
    med = statistics.median
    print(f"whole fits: {steps} steps each, log every {log_every}, validation every epoch")
    print(f"  default (TensorBoard) steps/s {_fmt(rates['default'])}, best {best_d:.1f}")
    print(f"  four loggers          steps/s {_fmt(rates['four'])}, best {best_f:.1f}")
    print(
        f"  ratio four/default: best-of-{rounds} {best_f / best_d:.3f}, median paired {med(paired):.3f}"
    )
    extra = med(hooks["four"]) - med(hooks["default"])
    print(
        f"  CPU in logger hooks per step (median): default {med(hooks['default']) * 1e3:.3f} ms, "
        f"four {med(hooks['four']) * 1e3:.3f} ms: +{extra * best_f:.2%} of a step at the best "
        f"rate; once per fit outside the loop: {med(outside['default']):.2f} s vs "
        f"{med(outside['four']):.2f} s"
    )


# ---------------------------------------------------------------------------- segments
class Gate(Callback):
    """Every `segment` steps (boundaries `offset` steps past a log): wait for the steps so far,
    record the segment's seconds, and switch the gated loggers between writing and dropping."""

    def __init__(self, gated, segment, offset, warmup):
        self.segment, self.offset, self.warmup = segment, offset, warmup
        self.on, self.times, self.start = False, {False: [], True: []}, None
        for logger in gated:
            logger.on_log = self._gate(logger.on_log)

    def _gate(self, on_log):
        return lambda engine, metrics: on_log(engine, metrics) if self.on else None

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        done = engine.global_step - self.warmup - self.offset
        if done < 0 or done % self.segment:
            return
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        if self.start is not None:
            self.times[self.on].append(now - self.start)
            self.on = not self.on
        self.start = now


def segments(root, count, segment, log_every):
    loggers = four_loggers(root)
    gate = Gate(loggers[1:], segment, offset=log_every // 2, warmup=2 * segment)
    steps = gate.warmup + gate.offset + segment * (count + 2)
    run_fit(loggers, [gate], root, steps, log_every, val_every=segment)
    off, on = gate.times[False], gate.times[True]
    # each segment with the three against the mean of its neighbours without (cancels a
    # linear drift): (steps/s with) / (steps/s without)
    pairs = [(off[i] + off[i + 1]) / 2 / on[i] for i in range(min(len(on), len(off) - 1))]
    q1, _, q3 = statistics.quantiles(pairs, n=4)
    print(
        f"segments: one fit, {len(pairs)} {segment}-step segments with the three, each against "
        f"its two neighbours without; log every "
        f"{log_every}, one validation per segment"
    )
    print(
        f"  TensorBoard alone {segment * len(off) / sum(off):.1f} steps/s | four loggers "
        f"{segment * len(on) / sum(on):.1f} steps/s | ratio four/default: median of pairs "
        f"{statistics.median(pairs):.3f} (quartiles {q1:.3f}-{q3:.3f})"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("both", "fits", "segments"), default="both")
    parser.add_argument("--rounds", type=int, default=7, help="pairs of whole fits")
    parser.add_argument("--steps", type=int, default=640, help="steps per fit (128 per epoch)")
    parser.add_argument("--segments", type=int, default=40, help="pairs of segments")
    parser.add_argument("--segment", type=int, default=200, help="steps per segment")
    parser.add_argument("--log-every", type=int, default=50, help="log_every_n_steps")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform} x {jax.device_count()}; "
        "MLP 784-256-256-10, batch 64"
    )
    with tempfile.TemporaryDirectory() as root:
        for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
            os.environ[name] = root
        run_fit(four_loggers(root), [], root, 2 * args.log_every, args.log_every)  # warm up
        if args.mode in ("both", "segments"):
            segments(root, 2 * args.segments, args.segment, args.log_every)
        if args.mode in ("both", "fits"):
            whole_fits(root, args.rounds, args.steps, args.log_every)


def _fmt(values):
    return "[" + ", ".join(f"{v:.0f}" for v in values) + "]"


if __name__ == "__main__":
    main()
