"""A character-level transformer language model on the source code of Python's `argparse`.

Token embedding -> a `Stack` of pre-norm causal attention + MLP blocks -> output head. The
same module runs under every strategy; under `pipeline` the Stack's layers are split over
the devices and microbatches flow through them.

    python examples/char_lm.py                                  # strategy "auto"
    python examples/char_lm.py --strategy pipeline --devices 4  # 4 stages, 8 microbatches
    python examples/char_lm.py --strategy pipeline --devices 2 --schedule circular --repeats 2
    python examples/char_lm.py --strategy dp --devices 8
    meshfit fit --config examples/char_lm.yaml --engine.devices 4   # the same run from a config

On a machine without an accelerator, --devices N gives N virtual CPU devices.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--strategy", default="auto", help="single, dp, pipeline, ... (default auto)")
    p.add_argument("--devices", type=int, default=None, help="devices (virtual CPUs if no GPU)")
    p.add_argument("--schedule", default="gpipe", choices=["gpipe", "circular"], help="pipeline")
    p.add_argument("--repeats", type=int, default=1, help="pipeline: virtual stages per device")
    p.add_argument("--microbatches", type=int, default=None, help="pipeline (default 2 x stages)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--root", default="./runs/char_lm", help="logs and checkpoints")
    p.add_argument("--target", type=float, default=2.0, help="exit non-zero above this val loss")
    return p.parse_args()


args = parse_args()
if args.devices:  # must happen before JAX initialises; only affects the CPU platform
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )

from char_lm_module import CharData, CharLM  # noqa: E402
from flax import nnx  # noqa: E402

from meshfit import Engine  # noqa: E402
from meshfit.strategies import Pipeline  # noqa: E402


def main() -> int:
    data = CharData(args.seq_len)
    module = CharLM(
        nnx.Rngs(0), args.dim, args.layers, args.heads, args.seq_len, args.lr, args.steps
    )
    strategy = args.strategy
    if strategy == "pipeline":
        strategy = Pipeline(
            microbatches=args.microbatches, schedule=args.schedule, repeats=args.repeats
        )
    engine = Engine(
        strategy=strategy,
        max_steps=args.steps,
        batch_size=args.batch_size,
        default_root_dir=args.root,
        log_every_n_steps=25,
        val_every_n_steps=args.steps,
    )
    engine.fit(module, datamodule=data)
    val_loss = engine.callback_metrics["val_loss"]
    print(
        f"strategy={engine.strategy.name} devices={len(engine.devices)} "
        f"train_windows={len(data.train[0])} val_loss={val_loss:.4f} "
        f"bits_per_char={val_loss / math.log(2):.3f}"
    )
    return 0 if val_loss <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
