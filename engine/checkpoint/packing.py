"""Fewer arrays per save: the small replicated leaves of the train state travel as one flat array
per dtype ("packed"), the others (sharded or large) as themselves.

Orbax spends a few milliseconds of Python per array it writes (specs, futures, metadata), far
more than writing a small array's bytes costs, and that time competes with the training step
(the GIL, and the CPU on a small machine). A replicated or single-device leaf holds the same
values on every device, so its bytes can be copied to the host and concatenated with the others
of its dtype: the 23 arrays of a small MLP's adam state become 2. Its place in the tree holds
None (an empty node to orbax) and `layout` (stored in the checkpoint's meta) records where it
went. Restoring slices it back out and places it with this run's sharding for that leaf.
Sharded leaves (FSDP, pipeline stages) are saved as before, each process writing its shards,
and so are leaves over `MAX_PACKED_BYTES`, whose fixed cost is small next to their size (and
which would otherwise be held twice in host memory while being concatenated).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from meshfit.engine.trees import key_name

PACKED = "packed"  # the train item's key holding the flat arrays, one per dtype
MAX_PACKED_BYTES = 4 * 2**20  # larger leaves are saved as arrays of their own

# layout: dtype -> [[keystr, name, shape, offset], ...] (JSON, in the checkpoint's meta)
Layout = dict[str, list]


def _name(path: tuple) -> str:
    """`a/b/c` for a key path with nnx's `.value` suffix dropped, as `trees.flat_shapes` names it."""
    names = [key_name(k) for k in path]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def _packable(x: Any) -> bool:
    sharding = getattr(x, "sharding", None)
    return (
        isinstance(x, jax.Array)
        and sharding is not None
        and sharding.is_fully_replicated
        and x.nbytes <= MAX_PACKED_BYTES
    )


def pack(item: dict[str, Any]) -> tuple[dict[str, Any], Layout]:
    """(the item to save, its layout): small replicated leaves copied to the host into one flat
    array per dtype (`item[PACKED]`), their places holding None. Blocks until those leaves are
    computed (like any save's device-to-host copy)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(item)
    chosen = [x for _, x in flat if _packable(x)]
    for x in chosen:  # start every transfer before waiting for the first
        x.copy_to_host_async()
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    layout: Layout = {}
    leaves = []
    for path, x in flat:
        if not _packable(x):
            leaves.append(x)
            continue
        host = np.asarray(x.addressable_data(0)).reshape(-1)
        dtype = str(host.dtype)
        offset = sizes.get(dtype, 0)
        sizes[dtype] = offset + host.size
        parts.setdefault(dtype, []).append(host)
        layout.setdefault(dtype, []).append(
            [jax.tree_util.keystr(path), _name(path), list(x.shape), offset]
        )
        leaves.append(None)  # an empty node to orbax: costs nothing to write
    saved = jax.tree_util.tree_unflatten(treedef, leaves)
    if parts:  # no empty node: orbax would not record it
        saved[PACKED] = {dtype: np.concatenate(p) for dtype, p in parts.items()}
    return saved, layout


def _entries(layout: Layout) -> dict[str, tuple[str, str, tuple[int, ...], int]]:
    """keystr -> (dtype, name, shape, offset) for every packed leaf."""
    return {
        key: (dtype, name, tuple(shape), offset)
        for dtype, rows in layout.items()
        for key, name, shape, offset in rows
    }


def packed_shapes(layout: Layout, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`name -> (shape, dtype)` of the packed leaves under `prefix` (e.g. "params"), the prefix
    removed: the form `trees.flat_shapes` gives for the saved arrays."""
    out = {}
    for dtype, name, shape, _ in _entries(layout).values():
        head, _, rest = name.partition("/")
        if head == prefix:
            out[rest] = (shape, str(np.dtype(dtype)))
    return out


def restore_target(abstract: dict[str, Any], layout: Layout) -> tuple[Any, Any]:
    """(item, restore_args) for reading `abstract` (ShapeDtypeStructs with shardings): packed
    leaves become None, and the flat arrays are read to the host."""
    entries = _entries(layout)

    def place(path, x):
        return None if jax.tree_util.keystr(path) in entries else x

    item = jax.tree_util.tree_map_with_path(place, abstract)
    args = ocp.checkpoint_utils.construct_restore_args(item)
    if layout:
        item[PACKED] = {d: np.empty((0,), d) for d in layout}  # structure only
        args[PACKED] = {d: ocp.RestoreArgs(restore_type=np.ndarray) for d in layout}
    return item, args


def unpack(restored: dict[str, Any], abstract: dict[str, Any], layout: Layout) -> Any:
    """`restored` with every packed leaf sliced out of its flat array and placed with the
    sharding `abstract` gives it (this run's layout), and `restored[PACKED]` dropped."""
    entries = _entries(layout)
    restored = dict(restored)
    flat = restored.pop(PACKED, {})

    def leaf(path, target, value):
        key = jax.tree_util.keystr(path)
        if key not in entries:
            return value
        dtype, _, shape, offset = entries[key]
        host = np.asarray(flat[dtype][offset : offset + math.prod(shape)]).reshape(shape)
        return jax.make_array_from_callback(shape, target.sharding, lambda index: host[index])

    return jax.tree_util.tree_map_with_path(leaf, abstract, restored)
