"""`PredictionWriter`: each process writes its own rows of every prediction batch to disk, for
outputs too large to gather (`Engine.predict(..., return_predictions=False)`)."""

from __future__ import annotations

import glob
import os
import re
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from meshfit.engine.hooks import Callback
from meshfit.engine.trees import path_str

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

_NAME = re.compile(r"predictions_p(\d+)_rows(\d+)-(\d+)\.(npy|npz)$")


class PredictionWriter(Callback):
    """Writes `dirpath/predictions_p{process}_rows{start}-{stop}.npy` per batch and process
    (`.npz` with one entry per leaf path when `predict_step` returns a pytree); rows are the
    global output rows [start, stop), so the files of all processes sorted by start concatenate
    to what `predict` would return."""

    def __init__(self, dirpath: str | os.PathLike):
        self.dirpath = os.fspath(dirpath)
        self.written: list[str] = []

    def on_predict_start(self, engine: Engine) -> None:
        os.makedirs(self.dirpath, exist_ok=True)
        self.written = []

    def on_predict_batch_end(
        self, engine: Engine, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        start, stop = engine.predict_rows
        if stop <= start:
            return  # this process holds only padding of this batch
        stem = f"predictions_p{jax.process_index():05d}_rows{start:010d}-{stop:010d}"
        path = os.path.join(self.dirpath, stem)
        if isinstance(outputs, np.ndarray):
            np.save(path + ".npy", outputs)
            self.written.append(path + ".npy")
        else:
            flat = jax.tree_util.tree_flatten_with_path(outputs)[0]
            np.savez(path + ".npz", **{path_str(p): leaf for p, leaf in flat})
            self.written.append(path + ".npz")


def read_predictions(dirpath: str | os.PathLike) -> Any:
    """The files a `PredictionWriter` wrote (all processes), concatenated in row order: an array,
    or a dict of arrays by leaf path for `.npz` files. Rows must be complete and not overlap."""
    files = []
    for path in glob.glob(os.path.join(os.fspath(dirpath), "predictions_p*_rows*")):
        m = _NAME.search(path)
        if m:
            files.append((int(m.group(2)), int(m.group(3)), path))
    if not files:
        raise FileNotFoundError(f"read_predictions: no prediction files in {dirpath}.")
    files.sort()
    expected = 0
    for start, stop, path in files:
        if start != expected:
            raise ValueError(f"read_predictions: rows {expected}..{start} are missing ({path}).")
        expected = stop
    parts = [np.load(path) for _, _, path in files]
    if files[0][2].endswith(".npy"):
        return np.concatenate(parts)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0].files}
