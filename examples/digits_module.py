"""The digits classifier and its data, importable without side effects (for `digits.py` and
for `meshfit fit --config examples/digits.yaml`)."""

from __future__ import annotations

import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from meshfit import DataModule, TrainModule


class Classifier(TrainModule):
    """An MLP 64 -> hidden -> hidden -> 10 on 8x8 digit images."""

    def __init__(self, rngs: nnx.Rngs, lr: float = 3e-3, hidden: int = 256, steps: int = 690):
        self.l1 = nnx.Linear(64, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)
        self.lr, self.steps = lr, steps

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

    def test_step(self, batch):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).mean())

    def configure_optimizers(self):
        schedule = optax.cosine_decay_schedule(self.lr, self.steps, alpha=0.1)
        return optax.adamw(schedule, weight_decay=1e-4)


def load(train_rows: int = 1500) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """scikit-learn's 1797 images with a fixed shuffle: `train_rows` for training, the rest
    for validation."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:train_rows], y[:train_rows]), (x[train_rows:], y[train_rows:])


class DigitsData(DataModule):
    """The digits as NumPy arrays; the held-out rows serve validation, test and predict."""

    def __init__(self, train_rows: int = 1500):
        self.train_rows = train_rows

    def setup(self, stage: str) -> None:
        self.train, self.val = load(self.train_rows)

    def train_data(self):
        return self.train

    def val_data(self):
        return self.val

    def test_data(self):
        return self.val

    def predict_data(self):
        return self.val[0]
