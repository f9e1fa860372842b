"""Train an MLP on scikit-learn's bundled handwritten digits (8x8 images, 10 classes).

    python examples/digits.py                      # all devices, strategy "auto"
    python examples/digits.py --strategy fsdp --devices 8

On a machine without an accelerator, --devices N gives N virtual CPU devices.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--strategy", default="auto", help="single, dp, fsdp, hybrid, ... (default auto)"
    )
    p.add_argument(
        "--devices", type=int, default=None, help="number of devices (virtual CPUs if no GPU)"
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--root", default="./runs/digits", help="logs and checkpoints")
    p.add_argument(
        "--target", type=float, default=0.95, help="exit non-zero below this val accuracy"
    )
    return p.parse_args()


args = parse_args()
if args.devices and "MESHFIT_NUM_PROCESSES" not in os.environ:
    # must happen before JAX initialises; only affects the CPU platform (under `meshfit launch`,
    # --cpu-devices-per-process sets the count instead)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from meshfit import Engine, TrainModule  # noqa: E402


class Classifier(TrainModule):
    def __init__(self, rngs: nnx.Rngs, lr: float = 3e-3):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 256, rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)
        self.lr = lr

    def __call__(self, x):
        return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        self.log("acc", (logits.argmax(-1) == y).mean(), prog_bar=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        self.log("val_loss", optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
        self.log("val_acc", (logits.argmax(-1) == y).mean(), prog_bar=True)

    def configure_optimizers(self):
        steps = 30 * 23
        return optax.adamw(
            optax.cosine_decay_schedule(self.lr, steps, alpha=0.1), weight_decay=1e-4
        )


def load() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """1797 images; a fixed shuffle, 1500 for training and 297 for validation."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def main() -> int:
    train, val = load()
    module = Classifier(nnx.Rngs(0), lr=args.lr)
    engine = Engine(
        strategy=args.strategy,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        precision=args.precision,
        default_root_dir=args.root,
        log_every_n_steps=10,
    )
    engine.fit(module, train, val_data=val)
    metrics = engine.callback_metrics
    if engine.is_global_zero:
        print(
            f"strategy={engine.strategy.name} devices={len(engine.devices)} "
            f"val_acc={metrics['val_acc']:.4f} val_loss={metrics['val_loss']:.4f}"
        )
    return 0 if metrics["val_acc"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
