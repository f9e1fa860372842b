"""`make_loader`: the loader for what was passed as data, after the bad-input checks."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from meshfit.engine.data import checks
from meshfit.engine.data.arrays import ArrayLoader, is_array_data
from meshfit.engine.data.iterables import IterableLoader, PerProcess
from meshfit.engine.data.sources import SourceLoader, ensure_grain_flags, is_source
from meshfit.engine.data.windows import MicroBatchWindows


def make_loader(
    data: Any,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    process_count: int,
    name: str,
    micro_batches: int = 1,
    workers: int = 0,
):
    """An ArrayLoader for NumPy data, a SourceLoader for a random-access source (read by
    `workers` processes, or threads when 0), an IterableLoader for anything iterable; with
    `micro_batches` > 1, windows of that many batches per step (`MicroBatchWindows`).

    Training loaders shuffle and drop the last partial batch; the others keep it."""
    if micro_batches > 1:
        inner = make_loader(
            data, batch_size, train=train, seed=seed, process_count=process_count, name=name,
            workers=workers,
        )  # fmt: skip
        return MicroBatchWindows(inner, micro_batches, name)
    checks.check_not_path(data, name)
    checks.check_python_lists(data, name)
    if isinstance(data, dict) and data and all(map(is_source, data.values())):
        raise TypeError(
            f"{name} is a dict of data sets (splits {sorted(data)}), e.g. a Hugging Face "
            f"DatasetDict; pass one of them, e.g. {name}=ds[{sorted(data)[0]!r}]."
        )
    if not is_array_data(data):
        leaves = jax.tree.leaves(data) if isinstance(data, tuple | list | dict) else [data]
        if leaves and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves):
            data = jax.tree.map(np.asarray, data)  # e.g. jax.Arrays
    if is_array_data(data):
        if isinstance(data, list):
            data = tuple(data)
        loader = ArrayLoader(data, batch_size, shuffle=train, drop_last=train, seed=seed, name=name)
        checks.check_equal_across_processes(name, "numbers of rows", loader.num_rows, process_count)
        return loader
    if is_source(data):
        checks.check_equal_across_processes(name, "numbers of records", len(data), process_count)
        return SourceLoader(
            data, batch_size, shuffle=train, drop_last=train, seed=seed, name=name,
            workers=workers,
        )  # fmt: skip
    ensure_grain_flags()  # a grain pipeline with mp_prefetch reads them when it starts
    if isinstance(data, PerProcess):
        loader = IterableLoader(data.batches, process_count, name, train=train)
        if hasattr(data.batches, "__len__"):
            checks.check_equal_across_processes(
                name, "numbers of batches per epoch", len(data.batches), process_count
            )
        return loader
    if process_count > 1:
        raise TypeError(
            f"{name} is an iterable of batches in a run of {process_count} processes. Each "
            "process must yield only its own rows of every global batch; wrap it as "
            "meshfit.PerProcess(batches) to say so (NumPy arrays are split automatically)."
        )
    return IterableLoader(data, process_count, name, train=train)
