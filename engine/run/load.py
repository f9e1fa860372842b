"""Weights for an evaluation (`Engine.test`/`predict`/`validate` with `ckpt_path`): "last",
"best" or a path, read from a training checkpoint into the module, in place."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from meshfit.engine.checkpoint.format import CheckpointError, reader, train_metadata
from meshfit.engine.checkpoint.restore import restore_args
from meshfit.engine.checkpoint.weights import load_weights
from meshfit.engine.hooks import StepTransform
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


def checkpoint_eval_states(
    transforms: Sequence[StepTransform], module: nnx.Module, path: str
) -> dict[str, Any]:
    """The states, read from the training checkpoint at step directory `path`, of the
    transforms that choose evaluation weights (`eval_params`, e.g. `EMA`), laid out like
    `module`'s parameters; those the checkpoint lacks are left out."""
    wanted = [t for t in transforms if type(t).eval_params is not StepTransform.eval_params]
    if not wanted:
        return {}
    directory, step = os.path.dirname(path), int(os.path.basename(path))
    manager = reader(directory)
    saved = (train_metadata(manager, step).get("state") or {}).get("extra") or {}
    params = nnx.state(module, nnx.Param)
    targets = {t.state_key: t.init(params) for t in wanted if t.state_key in saved}
    if not targets:
        return {}
    args = restore_args({"state": {"extra": targets}}, partial=True)
    return manager.restore(step, args=ocp.args.Composite(train=args))["train"]["state"]["extra"]
