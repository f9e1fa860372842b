"""Weights only: `save_weights` / `load_weights` for a plain module (also from a training
checkpoint), with the arrays landing in the module's own layout."""

from __future__ import annotations

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
    the layout `module`'s parameters already have; the module changes only after a complete
    read (a damaged checkpoint raises `DamagedCheckpoint` naming it). Returns `module`."""
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
            saved = saved_shapes(train_metadata(manager, step), meta, "params")
        layout = meta.get("packed") or {}

        def restore_fn(target):
            abstract = {"params": abstract_like(target)}
            args = restore_args(abstract, layout, partial=True)
            restored = manager.restore(step, args=ocp.args.Composite(train=args))["train"]
            return unpack(restored, abstract, layout)["params"]

    else:
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
