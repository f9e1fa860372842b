"""Data for the data-pipeline tests: dict-record modules, a counting source, an augmentation."""

import numpy as np

from tests.models import MLP, classification_data


class DictMLP(MLP):
    """The test MLP on dict batches ({"x", "y"}, plus any other keys, ignored)."""

    def training_step(self, batch):
        return super().training_step((batch["x"], batch["y"]))

    def validation_step(self, batch):
        return super().validation_step((batch["x"], batch["y"]))


class Records:
    """A user's random-access source: record i is (x[i], y[i]); `reads` logs every index read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.x[i], self.y[i]


def augment(record, rng):
    """A random per-record augmentation, the grain way (the rng is grain's, seeded per index)."""
    x, y = record
    return x + rng.normal(0.0, 0.1, x.shape).astype(np.float32), y


def records(n=320, seed=0):
    return Records(*classification_data(n=n, seed=seed))
