"""Reading a training checkpoint back: the state resharded onto this run's layout, with clear
errors for a mismatched module, optimizer or transforms, and for a damaged step (`damage.py`)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from meshfit.engine.checkpoint.damage import first_readable, reading
from meshfit.engine.checkpoint.find import Resume
from meshfit.engine.checkpoint.format import (
    CheckpointError,
    abstract_like,
    describe_signature,
    from_savable,
    optimizer_signature,
    read_meta,
    reader,
    saved_shapes,
    state_tree,
    train_item,
    train_metadata,
    tree_mismatches,
)
from meshfit.engine.checkpoint.packing import Layout, restore_target, unpack
from meshfit.engine.state import TrainState
from meshfit.engine.trees import flat_shapes


# ---------------------------------------------------------------------------- restoring
def check_compatible(
    manager: ocp.CheckpointManager, step: int, target: TrainState, meta: dict
) -> None:
    """Clear errors for a parameter tree or optimizer that does not match this run."""
    where = os.path.join(str(manager.directory), str(step))
    saved = train_metadata(manager, step)
    lines = tree_mismatches(saved_shapes(saved, meta, "params"), flat_shapes(target.params))
    if lines:
        raise CheckpointError(
            f"The parameters in checkpoint {where} do not match the module being trained "
            "(path: checkpoint vs this run):\n"
            + "\n".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "")
            + "\nResume with the same module configuration, or load matching weights with "
            "meshfit.load_weights."
        )
    ours = optimizer_signature(target.opt_state)
    if meta.get("optimizer") != ours:
        raise CheckpointError(
            f"Checkpoint {where} was written with a different optimizer: its optimizer state is "
            f"{describe_signature(meta.get('optimizer', '?'))}, this run's optimizer has "
            f"{describe_signature(ours)}. Resume with the optimizer the checkpoint was trained "
            "with (configure_optimizers, gradient_clip_val), or load only the weights with "
            "meshfit.load_weights(module, path) and start a new run."
        )
    expected_state = train_item(target)["state"]
    lines = tree_mismatches(saved_shapes(saved, meta, "state"), flat_shapes(expected_state))
    if lines:
        raise CheckpointError(
            f"The train state in checkpoint {where} does not match this run (module variables, "
            "optimizer or in-step transforms such as loss scaling / accumulation differ):\n"
            + "\n".join(lines[:20])
            + "\nUse the same callbacks and module as the run that wrote it."
        )


def restore_state(found: Resume, target: TrainState) -> tuple[TrainState, dict]:
    """Read the train state `find.resolve` found, resharded onto `target`'s layout (checked
    against it first), and its host meta (data position, callback states, metric window). For
    "last" (`found.fallback`), a damaged step gives way to the newest one that reads completely."""
    _, (state, meta) = first_readable(
        found.directory,
        (found.step, *found.fallback),
        lambda step: read_step(found.directory, step, target),
        fallback=bool(found.fallback),
    )
    return state, meta


def read_step(directory: str, step: int, target: TrainState) -> tuple[TrainState, dict]:
    """Step `step` read completely into fresh arrays laid out like `target`, and its meta;
    nothing else changes. A file that fails to read -> `DamagedCheckpoint` naming the step."""
    manager = reader(directory)
    with reading(os.path.join(directory, str(step))):
        meta = read_meta(manager, step)
        check_compatible(manager, step, target, meta)
        abstract = abstract_like(train_item(target))
        layout = meta.get("packed") or {}
        restored = manager.restore(
            step, args=ocp.args.Composite(train=restore_args(abstract, layout))
        )["train"]
        # every array is in memory before the caller swaps anything in
        restored = jax.block_until_ready(unpack(restored, abstract, layout))
    rest = from_savable(restored["state"], state_tree(target))
    state = TrainState(
        rest["step"], restored["params"], rest["rest"], rest["opt_state"], rest["extra"]
    )
    return state, meta


def restore_args(abstract: Any, layout: Layout, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Read the `train` item (or, `partial`, the subtrees `abstract` holds) into `abstract`'s
    layout; leaves packed at save time (`layout`) come back as host arrays for `unpack`."""
    item, args = restore_target(abstract, layout)
    return ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=partial)
