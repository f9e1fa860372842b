"""A character-level transformer language model on the source code of Python's `argparse`.

Token embedding -> a `Stack` of pre-norm causal attention + MLP blocks -> output head. The
same module runs under every strategy; under `pipeline` the Stack's layers are split over
the devices and microbatches flow through them.

    python examples/char_lm.py                                  # strategy "auto"
    python examples/char_lm.py --strategy pipeline --devices 4  # 4 stages, 8 microbatches
    python examples/char_lm.py --strategy pipeline --devices 2 --schedule circular --repeats 2
    python examples/char_lm.py --strategy dp --devices 8

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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from meshfit import Engine, Stack, TrainModule  # noqa: E402
from meshfit.strategies import Pipeline  # noqa: E402

VOCAB = 128  # ASCII; anything else maps to 0


class Block(nnx.Module):
    """Pre-norm causal self-attention and MLP, each with a residual: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        x = x + self.attn(self.norm1(x), mask=causal)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class CharLM(TrainModule):
    def __init__(self, rngs: nnx.Rngs, dim=64, layers=4, heads=4, seq_len=64, lr=5e-3, steps=200):
        self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
        self.blocks = Stack(lambda r: Block(dim, heads, r), layers, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB, rngs=rngs)
        self.lr, self.steps = lr, steps

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))

    def loss(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def training_step(self, batch):
        return self.loss(batch)

    def validation_step(self, batch):
        self.log("val_loss", self.loss(batch), prog_bar=True)

    def configure_optimizers(self):
        warmup = min(20, self.steps // 10)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.lr, warmup, self.steps, 0.1 * self.lr
        )
        return optax.adamw(schedule, weight_decay=1e-2)


def load(seq_len: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """argparse.py as ASCII codes; the first 90% for training windows, the rest for validation."""
    with open(argparse.__file__, encoding="utf-8") as f:
        codes = np.frombuffer(f.read().encode("ascii", "replace"), np.uint8).astype(np.int32)
    codes = np.where(codes < VOCAB, codes, 0)
    split = int(0.9 * len(codes))

    def windows(part: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
        starts = np.arange(0, len(part) - seq_len - 1, stride)
        idx = starts[:, None] + np.arange(seq_len + 1)
        w = part[idx]
        return w[:, :-1], w[:, 1:]

    return windows(codes[:split], seq_len // 4), windows(codes[split:], seq_len)


def main() -> int:
    train, val = load(args.seq_len)
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
    engine.fit(module, train, val_data=val)
    val_loss = engine.callback_metrics["val_loss"]
    print(
        f"strategy={engine.strategy.name} devices={len(engine.devices)} "
        f"train_windows={len(train[0])} val_loss={val_loss:.4f} "
        f"bits_per_char={val_loss / math.log(2):.3f}"
    )
    return 0 if val_loss <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
