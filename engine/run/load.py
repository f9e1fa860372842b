"""Weights for an evaluation (`Engine.test`/`predict`/`validate` with `ckpt_path`): "last",
"best" or a path, read from a training checkpoint into the module, in place."""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from meshfit.engine.checkpoint.damage import first_readable
from meshfit.engine.checkpoint.format import CheckpointError
from meshfit.engine.checkpoint.weights import load_weights
from meshfit.engine.run.fit import resolve_checkpoint


def load_checkpoint_weights(
    engine: Any, module: nnx.Module, ckpt_path: str | os.PathLike, what: str
) -> str:
    """Load the parameters of the checkpoint `ckpt_path` names into `module`; its step path.
    "last" skips damaged steps (with a warning) like `fit` does."""
    found = resolve_checkpoint(engine, ckpt_path)
    if found is None:
        raise CheckpointError(
            f"{what}(ckpt_path={os.fspath(ckpt_path)!r}): there is no checkpoint to load yet. "
            "Train with a ModelCheckpoint first, or pass a checkpoint path."
        )
    step, _ = first_readable(
        found.directory,
        (found.step, *found.fallback),
        lambda s: load_weights(module, os.path.join(found.directory, str(s))),
        fallback=bool(found.fallback),
        what=what,
    )
    return os.path.join(found.directory, str(step))
