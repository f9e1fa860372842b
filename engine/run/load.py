"""Weights for an evaluation (`Engine.test`/`predict`/`validate` with `ckpt_path`): "last",
"best" or a path, read from a training checkpoint into the module, in place."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import orbax.checkpoint as ocp
from flax import nnx

from meshfit.engine.checkpoint import find
from meshfit.engine.checkpoint.damage import first_readable
from meshfit.engine.checkpoint.format import (
    CheckpointError,
    abstract_like,
    read_meta,
    reader,
    train_metadata,
)
from meshfit.engine.checkpoint.packing import unpack
from meshfit.engine.checkpoint.restore import restore_args
from meshfit.engine.checkpoint.weights import load_weights
from meshfit.engine.hooks import StepTransform


def resolve_checkpoint(engine: Any, ckpt_path: str | os.PathLike) -> find.Resume | None:
    """Where `fit(ckpt_path=...)` reads, among the checkpoints this engine writes."""
    root = engine.config.default_root_dir
    directory = find.default_dir(root)
    for cb in engine.callbacks:
        resolved = getattr(cb, "resolved_dirpath", None)
        if callable(resolved):
            directory = resolved(engine)
            break
    return find.resolve(ckpt_path, directory, root)


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
    abstract = {"state": {"extra": abstract_like(targets)}}
    layout = read_meta(manager, step).get("packed") or {}  # small leaves saved packed
    args = restore_args(abstract, layout, partial=True)
    restored = manager.restore(step, args=ocp.args.Composite(train=args))["train"]
    return unpack(restored, abstract, layout)["state"]["extra"]
