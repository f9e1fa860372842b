"""Bad data, answered before any compile: what was given, what was expected, how to fix it."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from meshfit.engine.data.windows import MicroBatches

ACCEPTED = (
    "NumPy arrays (an array, or a tuple/dict of equal-length arrays), a random-access source "
    "(grain.MapDataset, a Hugging Face datasets.Dataset with .with_format('numpy'), or any "
    "object with __len__ and __getitem__ returning one record), or an iterable of batches "
    "(grain.IterDataset / grain.DataLoader, a generator, a list of (x, y) tuples)"
)
_NUMBER = (int, float, bool, complex)


def check_not_path(data: Any, name: str) -> None:
    """A file name is not data: say what is accepted and how to read files with grain."""
    if isinstance(data, str | bytes | os.PathLike):
        raise TypeError(
            f"{name} is a {type(data).__name__} ({os.fsdecode(data)[:80]!r}); meshfit does not "
            f"open files by name. Pass {ACCEPTED}. To train from files, open them as a source, "
            "e.g. grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)) or "
            "datasets.load_dataset('parquet', data_files=path, split='train')"
            ".with_format('numpy')."
        )


def _is_number_list(x: Any) -> bool:
    while isinstance(x, list) and x:
        x = x[0]
    return isinstance(x, _NUMBER)


def check_python_lists(data: Any, name: str) -> None:
    """Python lists of numbers inside data: tell to wrap them with np.asarray (the dtype is
    the user's call: np.asarray of floats gives float64)."""
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, tuple):
        items = list(enumerate(data))
    elif isinstance(data, list) and _is_number_list(data):
        items = [(None, data)]
    else:
        return
    for key, value in items:
        if isinstance(value, list) and _is_number_list(value):
            where = name if key is None else f"{name}[{key!r}]"
            raise TypeError(
                f"{where} is a Python list of {type(_first(value)).__name__} (length "
                f"{len(value)}); meshfit batches NumPy arrays. Wrap it with np.asarray, e.g. "
                f"np.asarray(values, dtype=np.float32) for inputs, np.int32 for labels."
            )


def _first(x: list) -> Any:
    while isinstance(x, list) and x:
        x = x[0]
    return x


def check_record_leaves(record: Any, index: int, name: str) -> None:
    """A record's values must be arrays or scalars (a list would flatten into many leaves)."""
    if isinstance(record, dict):
        values = list(record.values())
    else:
        values = list(record) if isinstance(record, tuple | list) else [record]
    for value in values:
        if isinstance(value, list | str | bytes) or value is None:
            hint = (
                " For a Hugging Face dataset call ds.with_format('numpy')."
                if isinstance(value, list)
                else ""
            )
            raise TypeError(
                f"{name}[{index}] holds a {type(value).__name__} ({str(value)[:60]}); every "
                "value of a record must be a NumPy array or a number (records are dicts or "
                "tuples of those)." + hint + " Convert it in the source, e.g. with a grain "
                ".map that returns np.asarray(...)."
            )


def describe(spec: tuple) -> str:
    """`{'x': float32[16], 'y': int32[]}` from (structure, [(shape, dtype)])."""
    treedef, shapes = spec
    leaves = [f"{np.dtype(d).name}{list(s)}" for s, d in shapes]
    return str(jax.tree.unflatten(treedef, leaves)).replace("'", "")


def record_mismatch(name: str, index: int, got: tuple, want: tuple) -> ValueError:
    return ValueError(
        f"{name}: record {index} is {describe(got)}, but record 0 is {describe(want)}. Every "
        "record must have the same structure, shapes and dtypes to be stacked into a batch: "
        "pad or crop it in the source (e.g. a grain .map), or fix the data at that index."
    )


def spec_of(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(x.shape), x.dtype) for x in leaves]


def check_same_structure(train_rows: Any, val_rows: Any, name: str = "val_data") -> None:
    """Validation rows need the training rows' structure and per-row shapes (dtypes may
    differ: the eval step is traced for its own inputs)."""
    if val_rows is None or train_rows is None:
        return
    train, val = spec_of(train_rows), spec_of(val_rows)
    if train[0] != val[0] or [s for s, _ in train[1]] != [s for s, _ in val[1]]:
        raise ValueError(
            f"{name} rows are {describe(val)}, but train_data rows are {describe(train)} "
            "(shapes without the batch axis). Pass validation data with the same structure "
            "(tuple order or dict keys) and per-row shapes as the training data."
        )


def indivisible(name: str, epoch: int, batch: int, rows: int, shards: int | None, why: str):
    multiple = f"a multiple of {shards}" if shards else "a multiple of the data-parallel size"
    return ValueError(
        f"{name}: batch {batch} of epoch {epoch} has {rows} rows, which the "
        f"{shards or 'data-parallel'} data-parallel devices cannot split evenly ({why}). "
        f"Yield batches of {multiple} rows: drop the last partial batch (e.g. grain's "
        ".batch(n, drop_remainder=True)) or choose the batch size accordingly."
    )


def check_equal_across_processes(name: str, what: str, value: int, process_count: int) -> None:
    """Processes that disagree on the number of rows/batches would hang a collective later:
    compare now (one small all-gather before compiling) and name every process's value."""
    if process_count <= 1:
        return
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64)))
    if len(set(values.tolist())) > 1:
        per = ", ".join(f"process {i}: {v}" for i, v in enumerate(values.tolist()))
        raise ValueError(
            f"{name}: the processes have different {what} ({per}). Every process must see the "
            f"same {what}, or the steps of an epoch would differ and a collective would hang. "
            "Give every process the same data (meshfit splits arrays and sources itself), or "
            "an equal share per process for meshfit.PerProcess iterables."
        )


def example_rows(batch: Any) -> Any:
    """Per-row shapes of an abstract training batch (gradient-accumulation windows unwrapped)."""
    data = batch.data if isinstance(batch, MicroBatches) else batch
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype), data)
