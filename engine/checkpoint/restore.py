"""Reading checkpoints back: resume a built engine (resharded onto its layout, with clear errors
for a mismatched module or optimizer), and the weights-only export/load for a plain module."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from meshfit.engine.checkpoint.format import (
    CheckpointError,
    _describe_signature,
    _is_step_dir,
    _reader,
    _state_tree,
    abstract_like,
    flat_shapes,
    from_savable,
    optimizer_signature,
    read_meta,
    train_item,
    train_metadata,
    tree_mismatches,
)
from meshfit.engine.data import resume as data_resume
from meshfit.engine.state import TrainState

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


# ---------------------------------------------------------------------------- restoring
def check_compatible(manager: ocp.CheckpointManager, step: int, engine: Engine, meta: dict) -> None:
    """Clear errors for a parameter tree or optimizer that does not match this run."""
    where = os.path.join(str(manager.directory), str(step))
    saved = train_metadata(manager, step)
    lines = tree_mismatches(flat_shapes(saved["params"]), flat_shapes(engine.state.params))
    if lines:
        raise CheckpointError(
            f"The parameters in checkpoint {where} do not match the module being trained "
            "(path: checkpoint vs this run):\n"
            + "\n".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "")
            + "\nResume with the same module configuration, or load matching weights with "
            "meshfit.load_weights."
        )
    ours = optimizer_signature(engine.state.opt_state)
    if meta.get("optimizer") != ours:
        raise CheckpointError(
            f"Checkpoint {where} was written with a different optimizer: its optimizer state is "
            f"{_describe_signature(meta.get('optimizer', '?'))}, this run's optimizer has "
            f"{_describe_signature(ours)}. Resume with the optimizer the checkpoint was trained "
            "with (configure_optimizers, gradient_clip_val), or load only the weights with "
            "meshfit.load_weights(module, path) and start a new run."
        )
    expected_state = train_item(engine.state)["state"]
    lines = tree_mismatches(flat_shapes(saved["state"]), flat_shapes(expected_state))
    if lines:
        raise CheckpointError(
            f"The train state in checkpoint {where} does not match this run (module variables, "
            "optimizer or in-step transforms such as loss scaling / accumulation differ):\n"
            + "\n".join(lines[:20])
            + "\nUse the same callbacks and module as the run that wrote it."
        )


def restore(engine: Engine, found: tuple[str, int] | None) -> int | None:
    """Load the checkpoint `resolve` found into a built engine: state (resharded onto its
    layout), callback states, data position. Returns the restored step (None: nothing to do)."""
    if found is None:
        return None
    directory, step = found
    manager = _reader(directory)
    meta = read_meta(manager, step)
    check_compatible(manager, step, engine, meta)
    restored = manager.restore(
        step, args=ocp.args.Composite(train=_restore_args(train_item(engine.state)))
    )["train"]
    new_params = restored["params"]
    rest = from_savable(restored["state"], _state_tree(engine.state))
    engine.state = TrainState(
        rest["step"], new_params, rest["rest"], rest["opt_state"], rest["extra"]
    )
    _restore_host(engine, meta)
    return step


def _restore_args(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Read the `train` item (or, `partial`, the subtrees `target` holds) into `target`'s layout."""
    abstract = abstract_like(target)
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )


def _restore_host(engine: Engine, meta: dict[str, Any]) -> None:
    """Data position, callback states, latest metrics and the unlogged metric window."""
    engine.global_step = int(meta["global_step"])
    engine.current_epoch = int(meta["current_epoch"])
    engine.batch_idx = int(meta["batch_idx"])
    engine.callback_metrics.update(meta.get("callback_metrics", {}))
    states = meta.get("callbacks", {})
    for cb in engine.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    data_resume.restore_data_state(engine, meta)  # this process's data-iterator state
    window = getattr(engine, "_train_window", None)
    saved = meta.get("metric_window") or {}
    if window is not None:
        for values, weight in zip(saved.get("steps", []), saved.get("weights", []), strict=True):
            window.add({k: np.float32(v) for k, v in values.items()}, weight=weight)


# ---------------------------------------------------------------------------- weights only
def save_weights(module: nnx.Module, path: str | os.PathLike) -> str:
    """Write only `module`'s parameters to the directory `path` (orbax, no pickle); blocks."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"save_weights: {path} already exists; choose a new directory.")
    params = nnx.state(module, nnx.Param)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return path


def load_weights(module: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Load parameters into `module` in place, from `save_weights` output or a training
    checkpoint (a step directory, or a checkpoint directory: its newest step). Arrays land with
    the layout `module`'s parameters already have. Returns `module`."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(
            f"load_weights: {path} does not exist. Pass a directory written by "
            "meshfit.save_weights or a training checkpoint directory."
        )
    target = nnx.state(module, nnx.Param)
    expected = flat_shapes(target)
    restore_fn: Callable[[Any], Any]
    if _is_step_dir(path) or (os.path.isdir(path) and _reader(path).all_steps()):
        directory, step = (
            (os.path.dirname(path), int(os.path.basename(path)))
            if _is_step_dir(path)
            else (path, max(_reader(path).all_steps()))
        )
        manager = _reader(directory)
        read_meta(manager, step)  # the format check
        saved = flat_shapes(train_metadata(manager, step)["params"])

        def restore_fn(abstract):
            args = _restore_args({"params": abstract}, partial=True)
            return manager.restore(step, args=ocp.args.Composite(train=args))["train"]["params"]

    else:
        checkpointer = ocp.StandardCheckpointer()
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
    nnx.update(module, restore_fn(target))
    return module
