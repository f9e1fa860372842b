"""Small modules and data shared by the tests."""

import numpy as np
import optax
from flax import nnx

from meshfit import TrainModule


def classification_data(n=512, features=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    y = (x @ w).argmax(-1).astype(np.int32)
    return x, y


class MLP(TrainModule):
    def __init__(self, rngs: nnx.Rngs, features=16, hidden=32, classes=4, lr=1e-2, opt="adam"):
        self.l1 = nnx.Linear(features, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, rngs=rngs)
        self.lr, self.opt = lr, opt

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        self.log("acc", (logits.argmax(-1) == y).mean(), prog_bar=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(-1) == y).mean())
        self.log("val_count", np.float32(1.0) * x.shape[0], reduce="sum")

    def configure_optimizers(self):
        return getattr(optax, self.opt)(self.lr)


def quiet(**kwargs):
    """Engine kwargs with the default progress bar and logger off (tests that need them say so)."""
    return dict(enable_progress_bar=False, logger=False, **kwargs)
