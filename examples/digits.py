"""Train an MLP on scikit-learn's bundled handwritten digits (8x8 images, 10 classes).

    python examples/digits.py                      # all devices, strategy "auto"
    python examples/digits.py --strategy fsdp --devices 8
    meshfit fit --config examples/digits.yaml          # the same run from a config file

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

from digits_module import Classifier, DigitsData  # noqa: E402
from flax import nnx  # noqa: E402

from meshfit import Engine  # noqa: E402


def main() -> int:
    module = Classifier(nnx.Rngs(0), lr=args.lr, steps=args.epochs * 23)
    engine = Engine(
        strategy=args.strategy,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        precision=args.precision,
        default_root_dir=args.root,
        log_every_n_steps=10,
    )
    engine.fit(module, datamodule=DigitsData())
    metrics = engine.callback_metrics
    if engine.is_global_zero:
        print(
            f"strategy={engine.strategy.name} devices={len(engine.devices)} "
            f"val_acc={metrics['val_acc']:.4f} val_loss={metrics['val_loss']:.4f}"
        )
    return 0 if metrics["val_acc"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
