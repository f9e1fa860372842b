"""Weights for an evaluation (`Engine.test`/`predict`/`validate` with `ckpt_path`): "last",
"best" or a path, read from a training checkpoint into the module, in place."""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from meshfit.engine.checkpoint.format import CheckpointError
from meshfit.engine.checkpoint.weights import load_weights
from meshfit.engine.run.fit import resolve_checkpoint


def load_checkpoint_weights(
    engine: Any, module: nnx.Module, ckpt_path: str | os.PathLike, what: str
) -> str:
    """Load the parameters of the checkpoint `ckpt_path` names into `module`; its step path."""
    found = resolve_checkpoint(engine, ckpt_path)
    if found is None:
        raise CheckpointError(
            f"{what}(ckpt_path={os.fspath(ckpt_path)!r}): there is no checkpoint to load yet. "
            "Train with a ModelCheckpoint first, or pass a checkpoint path."
        )
    directory, step = found
    path = os.path.join(directory, str(step))
    load_weights(module, path)
    return path
