"""Weights only: `save_weights` / `load_weights` for a plain module (also from a training
checkpoint), with the arrays landing in the module's own layout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from meshfit.engine.checkpoint.damage import reading
from meshfit.engine.checkpoint.format import (
    CheckpointError,
    abstract_like,
    is_step_dir,
    read_meta,
    reader,
    saved_shapes,
    train_metadata,
    tree_mismatches,
)
from meshfit.engine.checkpoint.packing import unpack
from meshfit.engine.checkpoint.restore import restore_args
from meshfit.engine.trees import flat_shapes

#: Where the `EMA` callback keeps its average in `TrainState.extra` (and in checkpoints).
EMA_STATE_KEY = "EMA"
#: Beside the arrays of a weights directory: which weights it holds ({"ema": bool}).
WEIGHTS_INFO = "meshfit_weights.json"


def source_params(source: Any, ema: bool) -> Any:
    """The parameters `save_weights` writes: a module's own; an engine's trained ones, or with
    `ema=True` its moving average (a clear error where there is none)."""
    if isinstance(source, nnx.Module):
        if ema:
            raise CheckpointError(
                f"save_weights({type(source).__name__} module, ..., ema=True): a module holds "
                "only its own weights; the moving average lives in the training run. Pass the "
                "engine that fitted it: meshfit.save_weights(engine, path, ema=True)."
            )
        return nnx.state(source, nnx.Param)
    state = getattr(source, "state", None)
    if state is None or not hasattr(state, "params"):
        raise TypeError(
            f"save_weights expects an nnx.Module or an Engine after fit, got "
            f"{type(source).__name__}."
        )
    if not ema:
        return state.params
    extra = getattr(state, "extra", None) or {}
    if EMA_STATE_KEY not in extra:
        raise CheckpointError(
            "save_weights(engine, ..., ema=True): this run has no EMA of the weights. Add "
            "meshfit.callbacks.EMA(decay=...) to Engine(callbacks=[...]) and fit again, or save "
            "the trained weights with ema=False."
        )
    return extra[EMA_STATE_KEY]["params"]


def save_weights(source: Any, path: str | os.PathLike, ema: bool = False) -> str:
    """Write only parameters to the directory `path` (orbax, no pickle); blocks. `source`: a
    module (its weights), or an engine after fit (its trained weights, or with `ema=True` their
    moving average from the `EMA` callback, which `load_weights` then loads as plain weights)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"save_weights: {path} already exists; choose a new directory.")
    params = source_params(source, ema)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(path, WEIGHTS_INFO), "w") as f:
            json.dump({"ema": bool(ema)}, f)
    return path


def _saved_as_ema(path: str) -> bool:
    try:
        with open(os.path.join(path, WEIGHTS_INFO)) as f:
            return bool(json.load(f).get("ema", False))
    except FileNotFoundError:
        return False


def load_weights(module: nnx.Module, path: str | os.PathLike, ema: bool = False) -> nnx.Module:
    """Load parameters into `module` in place, from `save_weights` output or a training
    checkpoint (a step directory, or a checkpoint directory: its newest step). Arrays land with
    the layout `module`'s parameters already have; the module changes only after a complete
    read (a damaged checkpoint raises `DamagedCheckpoint` naming it). `ema=True` loads the
    moving average of the weights (`EMA` callback) that the checkpoint or weights directory
    holds. Returns `module`."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(
            f"load_weights: {path} does not exist. Pass a directory written by "
            "meshfit.save_weights or a training checkpoint directory."
        )
    target = nnx.state(module, nnx.Param)
    expected = flat_shapes(target)
    restore_fn: Callable[[Any], Any]
    where = path  # the directory read, for errors
    if is_step_dir(path) or (os.path.isdir(path) and reader(path).all_steps()):
        directory, step = (
            (os.path.dirname(path), int(os.path.basename(path)))
            if is_step_dir(path)
            else (path, max(reader(path).all_steps()))
        )
        manager = reader(directory)
        where = os.path.join(directory, str(step))
        with reading(where):
            meta = read_meta(manager, step)  # and the format check
            tree = train_metadata(manager, step)
            if ema:
                _ema_metadata(tree, where)  # a clear error when the run had no EMA
                prefix = f"extra/{EMA_STATE_KEY}/params/"
                state = saved_shapes(tree, meta, "state")
                saved = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            else:
                saved = saved_shapes(tree, meta, "params")
        layout = meta.get("packed") or {}

        def restore_fn(target):
            abstract = {"params": abstract_like(target)}
            if ema:
                abstract = {"state": {"extra": {EMA_STATE_KEY: abstract}}}
            args = restore_args(abstract, layout, partial=True)
            restored = manager.restore(step, args=ocp.args.Composite(train=args))["train"]
            out = unpack(restored, abstract, layout)
            return (out["state"]["extra"][EMA_STATE_KEY] if ema else out)["params"]

    else:
        if ema and not _saved_as_ema(path):
            raise CheckpointError(
                f"load_weights(..., ema=True): {path} holds trained weights, not a moving "
                "average (it was not written by save_weights(engine, path, ema=True)). Load it "
                "with ema=False, or pass a training checkpoint of a run with an EMA callback."
            )
        checkpointer = ocp.StandardCheckpointer()
        with reading(path):
            saved = flat_shapes(checkpointer.metadata(path).item_metadata)

        def restore_fn(target):
            return checkpointer.restore(path, abstract_like(target))

    lines = tree_mismatches(saved, expected)
    if lines:
        raise CheckpointError(
            f"The weights in {path} do not match {type(module).__name__}:\n"
            + "\n".join(lines[:20])
            + "\nBuild the module with the configuration it was trained with."
        )
    with reading(where):  # into fresh arrays: the module changes only after a complete read
        weights = jax.block_until_ready(restore_fn(target))
    nnx.update(module, weights)
    return module


def _ema_metadata(saved: dict, where: str) -> dict:
    """The EMA entry of a training checkpoint's `train` metadata, or a clear error."""
    extra = (saved.get("state") or {}).get("extra") or {}
    if EMA_STATE_KEY not in extra or "params" not in (extra[EMA_STATE_KEY] or {}):
        raise CheckpointError(
            f"load_weights(..., ema=True): checkpoint {where} holds no EMA of the weights (its "
            "run had no meshfit.callbacks.EMA). Load the trained weights with ema=False."
        )
    return extra[EMA_STATE_KEY]
