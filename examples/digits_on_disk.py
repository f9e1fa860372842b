"""Train from data on disk: scikit-learn's digits written to ArrayRecord files, read back by
grain worker processes with a random augmentation (a shift of up to one pixel, and noise).

    python examples/digits_on_disk.py                 # writes runs/digits_disk/data/*.array_record
    python examples/digits_on_disk.py --workers 4 --strategy dp

Each record is 65 bytes: the 8x8 image (0..16 per pixel) then the label.
"""

from __future__ import annotations

import argparse
import os

import grain
import numpy as np
import optax
from flax import nnx

from meshfit import Engine, TrainModule


def write_split(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """One ArrayRecord file, a record per example."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    for image, label in zip(images, labels):
        writer.write(np.append(image.astype(np.uint8), np.uint8(label)).tobytes())
    writer.close()


def write_digits(directory: str) -> tuple[str, str]:
    """Train/validation ArrayRecord files of the digits (written once)."""
    from sklearn.datasets import load_digits

    os.makedirs(directory, exist_ok=True)
    paths = (
        os.path.join(directory, "train.array_record"),
        os.path.join(directory, "val.array_record"),
    )
    if not all(map(os.path.exists, paths)):
        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], y[order]
        write_split(paths[0], x[:1500], y[:1500])
        write_split(paths[1], x[1500:], y[1500:])
    return paths


def decode(record: bytes) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(record, np.uint8)
    return raw[:64].astype(np.float32) / 16.0, raw[64].astype(np.int32)


def augment(example, rng: np.random.Generator):
    """Shift the image by up to one pixel and add noise; grain seeds `rng` per record."""
    image, label = example
    dy, dx = rng.integers(-1, 2, size=2)
    image = np.roll(image.reshape(8, 8), (dy, dx), axis=(0, 1)).reshape(64)
    return image + rng.normal(0.0, 0.05, 64).astype(np.float32), label


def pipeline(path: str, train: bool) -> grain.MapDataset:
    """A random-access grain pipeline over one file; meshfit shuffles, batches and shards it."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(path)).map(decode)
    return ds.random_map(augment, seed=0) if train else ds


class Classifier(TrainModule):
    def __init__(self, rngs: nnx.Rngs, lr: float = 3e-3):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)
        self.lr = lr

    def __call__(self, x):
        return self.out(nnx.relu(self.l1(x)))

    def training_step(self, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self(x), y).mean()

    def validation_step(self, batch):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).mean())

    def configure_optimizers(self):
        return optax.adam(self.lr)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--strategy", default="auto")
    p.add_argument("--workers", type=int, default=2, help="grain worker processes")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--root", default="./runs/digits_disk")
    p.add_argument("--target", type=float, default=0.9, help="exit non-zero below this val_acc")
    args = p.parse_args()
    train_path, val_path = write_digits(os.path.join(args.root, "data"))
    engine = Engine(
        strategy=args.strategy,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        data_workers=args.workers,
        default_root_dir=args.root,
    )
    engine.fit(Classifier(nnx.Rngs(0)), pipeline(train_path, True), pipeline(val_path, False))
    acc = engine.callback_metrics["val_acc"]
    print(f"val_acc {acc:.3f}")
    if acc < args.target:
        raise SystemExit(f"val_acc {acc:.3f} is below the target {args.target}")


if __name__ == "__main__":
    main()
