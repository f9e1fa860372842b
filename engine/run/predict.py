"""`PredictRun`: `Engine.predict`, `predict_step` over every input row, in input order.

Each batch is padded to the batch layout on the device (one compiled step for all batches,
any strategy can split it), and the padding is dropped on the host. With several processes
every process gathers the full result by default; with `return_predictions=False` each
process only hands its own rows to `on_predict_batch_end` (e.g. a `PredictionWriter`)."""

from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from meshfit.engine.data import ArrayLoader, IterableLoader
from meshfit.engine.run.evaluate import EvalRun
from meshfit.engine.run.predict_data import (
    PaddedBatch,
    array_batches,
    check_same_structure,
    iterable_batches,
)
from meshfit.engine.run.test import trace_or_explain
from meshfit.engine.step.build import PRECISIONS, make_predict_step
from meshfit.engine.trees import path_str


def batch_multiple(strategy: Any) -> Any:
    """`rows -> rows rounded up` to the smallest batch the strategy can split (for a pipeline:
    microbatches × data), found by asking the strategy's own batch-size check."""
    dp = strategy.data_parallel_size
    step = dp
    for k in range(1, 4097):
        try:
            strategy.check_batch_size(k * dp)
        except ValueError:
            continue
        step = k * dp
        break
    return lambda rows: -(-rows // step) * step


def check_rows(abstract_out: Any, rows: int) -> None:
    """Every leaf of `predict_step`'s output must have the batch's rows first (names the leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_out)[0]
    if not flat:
        raise ValueError("predict_step returned no arrays; return per-row outputs, e.g. logits.")
    for path, leaf in flat:
        shape = tuple(leaf.shape)
        if not shape or shape[0] != rows:
            name = path_str(path) or "the output"
            raise ValueError(
                f"predict_step returned {name} with shape {shape}, which has no leading row "
                f"dimension of the batch's {rows} rows. Return per-row outputs (shape "
                f"({rows}, ...)); reduce over the batch on the host instead."
            )


def local_rows(x: jax.Array, lo: int, count: int) -> np.ndarray:
    """Rows [lo, lo + count) of a batch-sharded global array that this process holds."""
    if x.is_fully_addressable:
        return np.asarray(x)[lo : lo + count]
    shards = {(s.index[0].start or 0): s.data for s in x.addressable_shards}
    base = min(shards)
    held = np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
    return held[lo - base : lo - base + count]


def gather_rows(x: jax.Array, keep: list[tuple[int, int]]) -> np.ndarray:
    """The data rows of a global batch, on every process (a collective when several)."""
    full = np.asarray(
        x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
    )
    return np.concatenate([full[a : a + n] for a, n in keep])


class PredictRun(EvalRun):
    """An `EvalRun` that runs `predict_step` (built once the first batch's shapes are known)."""

    def predict(self, loader: Any, return_predictions: bool = True) -> Any:
        engine, hooks = self.engine, self.hooks
        if isinstance(loader, ArrayLoader):
            self.strategy.check_batch_size(loader.batch_size, "Predict batch size")
            batches = array_batches(loader, self.placer.rows_for)
        elif isinstance(loader, IterableLoader):
            batches = iterable_batches(loader, self.placer.rows_for, batch_multiple(self.strategy))
        else:
            raise TypeError(f"predict cannot batch {type(loader).__name__}.")
        hooks("on_predict_start")
        want_local = hooks.has("on_predict_batch_end")
        results: list[Any] = []
        pending: collections.deque = collections.deque()
        step, first = None, None
        params = self.eval_params()
        for i, padded in enumerate(batches):
            if first is None:
                first = padded.host.local
                step = self._compile_for(padded)
            else:
                check_same_structure(first, padded.host.local, i)
            out = step(params, self.state.rest, self.placer.place(padded.host))
            pending.append((i, padded, out))
            if len(pending) > 1:  # the host copies of batch i-1 overlap batch i on the device
                self._finish(*pending.popleft(), results, return_predictions, want_local)
        while pending:
            self._finish(*pending.popleft(), results, return_predictions, want_local)
        engine.predict_rows = None
        hooks("on_predict_end")
        if not return_predictions or not results:
            return None
        return jax.tree.map(lambda *xs: np.concatenate(xs), *results)

    def _compile_for(self, padded: PaddedBatch) -> Any:
        """The jitted predict step, its outputs laid out like the batch; checked by tracing
        (shapes only) first, so a wrong output or batch structure fails before compiling."""
        step = make_predict_step(
            self.graphdef,
            compute_dtype=PRECISIONS[self.config.precision],
            context=self.strategy.step_context,
        )
        rows = padded.host.global_size
        abstract_batch = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((rows, *np.shape(x)[1:]), np.asarray(x).dtype),
            padded.host.local,
        )
        params, rest = self.eval_params(), self.state.rest
        out = trace_or_explain(step, "predict_step", params, rest, abstract_batch)
        check_rows(out, rows)
        shardings = jax.tree.map(lambda x: self.strategy.batch_sharding(x.ndim), out)
        return jax.jit(step, out_shardings=shardings)

    def _finish(self, i, padded, out, results, gather: bool, want_local: bool) -> None:
        if gather:
            results.append(jax.tree.map(lambda x: gather_rows(x, padded.keep), out))
        if want_local:
            local = jax.tree.map(lambda x: local_rows(x, padded.lo, padded.real), out)
            self.engine.predict_rows = (padded.offset, padded.offset + padded.real)
            self.hooks("on_predict_batch_end", local, padded.host.local, i)
