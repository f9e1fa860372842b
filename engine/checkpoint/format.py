"""The checkpoint format: its items, the JSON meta, PRNG-key conversion, readable mismatches.

A training checkpoint is one step directory written by an orbax `CheckpointManager` with two
items: `train`, the arrays (`params`: the module's parameters; `state`: step, other module
variables with PRNG keys stored as raw `key_data`, optimizer state, in-step transform states),
and `meta` (JSON: the data position, every callback's `state_dict`, the unlogged metric window,
the optimizer's state layout). One array item, not two: each orbax item has a fixed cost, and
this halves the time a save blocks the loop. For the same reason (format 3) the small replicated
leaves travel as one flat array per dtype (`packing.py`; their layout is in `meta["packed"]`),
and no orbax `_sharding` file is written. Arrays are restored onto abstract targets that
carry this run's shardings, so a checkpoint written under one strategy reads back resharded
under another (`meshfit.engine.checkpoint.restore`). Nothing is pickled: loading runs no code.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from meshfit.engine.checkpoint.packing import packed_shapes
from meshfit.engine.state import TrainState
from meshfit.engine.trees import flat_shapes

FORMAT_VERSION = 3  # 1: `params` and `state` as separate items; 2: replicated leaves unpacked
READABLE_FORMATS = (2,)  # older formats still read (2: no meta["packed"], every leaf an array)
ITEMS = ("train", "meta")


def _array_registry() -> Any:
    """Orbax's standard type handlers, except that arrays are written without the `_sharding`
    file: restores always pass this run's shardings, and writing it costs every save ~20% of
    its CPU time."""
    handlers = [
        (t, ocp.type_handlers.get_type_handler(t))
        for t in ocp.type_handlers.supported_types()
        if t is not jax.Array
    ]
    array = ocp.type_handlers.ArrayHandler(enable_write_sharding_file=False)
    return ocp.type_handlers.create_type_handler_registry(*handlers, (jax.Array, array))


def item_handlers() -> dict[str, Any]:
    """Handlers for the items, so metadata and partial restores work in a fresh process."""
    return {
        "train": ocp.PyTreeCheckpointHandler(type_handler_registry=_array_registry()),
        "meta": ocp.JsonCheckpointHandler(),
    }


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run (missing, mismatched, from another optimizer,
    damaged)."""


# ---------------------------------------------------------------------------- pytree helpers
def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: Any) -> Any:
    """Typed PRNG keys -> their raw uint32 `key_data` (typed keys do not serialize)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree: Any, template: Any) -> Any:
    """Rebuild typed PRNG keys where `template` holds them (same impl, same sharding)."""

    def back(raw, like):
        if not _is_key(like):
            return raw
        key = jax.random.wrap_key_data(raw, impl=jax.random.key_impl(like))
        return jax.device_put(key, like.sharding) if hasattr(like, "sharding") else key

    return jax.tree.map(back, tree, template)


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding targets: orbax reads each array straight into this layout."""

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(spec, tree)


def tree_mismatches(saved: dict, expected: dict) -> list[str]:
    """Readable lines for every path missing, unexpected or of another shape/dtype."""
    lines = []
    for path in sorted(set(saved) | set(expected)):
        if path not in saved:
            lines.append(f"  {path}: expected {_fmt(expected[path])}, missing in checkpoint")
        elif path not in expected:
            lines.append(f"  {path}: in checkpoint {_fmt(saved[path])}, not in this run")
        elif saved[path] != expected[path]:
            lines.append(
                f"  {path}: checkpoint {_fmt(saved[path])}, this run {_fmt(expected[path])}"
            )
    return lines


def _fmt(entry: tuple[tuple[int, ...], str]) -> str:
    return f"{entry[1]}{list(entry[0])}"


def optimizer_signature(opt_state: Any) -> str:
    """The optimizer state's layout (node types and leaf paths): differs between optimizers."""
    types: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            types.append(type(node).__name__)
        for child in node if isinstance(node, list | tuple) else ():
            visit(child)

    visit(opt_state)
    paths = ",".join(sorted(flat_shapes(opt_state)))
    return f"{'+'.join(types) or type(opt_state).__name__}|{paths}"


def describe_signature(sig: str) -> str:
    return sig.split("|", 1)[0]


# ---------------------------------------------------------------------------- items
def state_tree(state: TrainState) -> dict[str, Any]:
    """Everything but the parameters, as a plain dict (the `state` part of `train`)."""
    return {
        "step": state.step,
        "rest": state.rest,
        "opt_state": state.opt_state,
        "extra": state.extra,
    }


def train_item(state: TrainState) -> dict[str, Any]:
    """The `train` item: `params` and the savable rest of the state."""
    return {"params": state.params, "state": to_savable(state_tree(state))}


def host_meta(
    *,
    global_step: int,
    position: tuple[int, int],
    seed: int,
    callbacks: dict[str, Any],
    callback_metrics: dict[str, float],
    metric_window: dict[str, Any],
    opt_state: Any,
    **extra: Any,
) -> dict[str, Any]:
    """The `meta` item: data position, callback states, unlogged metrics, optimizer layout."""
    epoch, batch_idx = position
    return {
        "format": FORMAT_VERSION,
        "global_step": int(global_step),
        "current_epoch": int(epoch),
        "batch_idx": int(batch_idx),
        "seed": seed,
        "callbacks": callbacks,
        "callback_metrics": dict(callback_metrics),
        "metric_window": metric_window,
        "optimizer": optimizer_signature(opt_state),
        **extra,
    }


# ---------------------------------------------------------------------------- reading
def reader(directory: str) -> ocp.CheckpointManager:
    """A read-only manager over a checkpoint directory."""
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
        item_handlers=item_handlers(),
    )


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The `meta` item, after checking this meshfit can read the checkpoint's format."""
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    version = meta.get("format", 0)
    if version != FORMAT_VERSION and version not in READABLE_FORMATS:
        where = os.path.join(str(manager.directory), str(step))
        readable = ", ".join(str(v) for v in (*READABLE_FORMATS, FORMAT_VERSION))
        raise CheckpointError(
            f"Checkpoint {where} has format {version}; this meshfit reads formats {readable}. "
            + (
                "Upgrade meshfit to resume from it."
                if version > FORMAT_VERSION
                else "It was written by an older meshfit: resume it with that version, or "
                "read its `params` item with orbax and meshfit.load_weights' layout."
            )
        )
    return meta


def train_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """Shapes and dtypes of the `train` item: {"params": ..., "state": ...} (packed leaves are
    not there: see `saved_shapes`)."""
    return manager.item_metadata(step)["train"]


def saved_shapes(saved: dict[str, Any], meta: dict[str, Any], part: str) -> dict[str, Any]:
    """`path -> (shape, dtype)` of every leaf of `part` ("params" or "state") of a checkpoint,
    packed or not, from its train metadata and meta."""
    return {**flat_shapes(saved.get(part) or {}), **packed_shapes(meta.get("packed") or {}, part)}


def is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and all(
        os.path.isdir(os.path.join(path, item)) for item in ITEMS
    )
