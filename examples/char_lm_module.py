"""The character-level transformer LM and its data (Python's own `argparse.py`), importable
without side effects (for `char_lm.py` and `meshfit fit --config examples/char_lm.yaml`)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from meshfit import DataModule, Stack, TrainModule

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


class CharData(DataModule):
    """Windows of `seq_len` characters: overlapping for training, disjoint for validation."""

    def __init__(self, seq_len: int = 64):
        self.seq_len = seq_len

    def setup(self, stage: str) -> None:
        self.train, self.val = load(self.seq_len)

    def train_data(self):
        return self.train

    def val_data(self):
        return self.val
