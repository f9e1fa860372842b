"""`find_batch_size`: the largest global batch whose compiled training step fits device memory.

Each candidate is compiled ahead of time on abstract inputs (no arrays are allocated, no
step runs) and sized with `memory_analysis()`, so a batch that does not fit is rejected
without an out-of-memory crash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from meshfit.engine.data import make_loader
from meshfit.engine.engine import Engine
from meshfit.engine.hardware import compiled_memory, min_device_memory
from meshfit.engine.step.build import leaves_train_step
from meshfit.engine.step.fused import FusedStep, empty_metrics, stacked_sharding


class BatchSizeEstimate(NamedTuple):
    """`batch_size`: the largest global batch that fits; `bytes_per_device`: what its compiled
    step needs on the busiest device (arguments + outputs - donated aliases + temporaries)."""

    batch_size: int
    bytes_per_device: int


def _row_spec(data: Any) -> tuple[Any, int | None]:
    """Shape/dtype of one row of `data` (arrays, or an iterable of batches) and the row count
    of array data (a training batch cannot be larger)."""
    loader = make_loader(data, 1, train=False, seed=0, process_count=1, name="data")
    if hasattr(loader, "num_rows"):
        sample, rows = loader.data, loader.num_rows
    else:
        sample, rows = next(iter(loader.data)), None
        sample = jax.tree.map(np.asarray, sample)
    for leaf in jax.tree.leaves(sample):
        if np.ndim(leaf) == 0:
            raise ValueError(
                "find_batch_size: every array of data needs a leading batch dimension, got a "
                "scalar leaf. Pass arrays shaped (rows, ...)."
            )
    spec = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], np.asarray(x).dtype), sample
    )
    return spec, rows


def search_largest(measure: Callable[[int], float], budget: float, limit: int) -> int:
    """The largest m in [1, limit] with measure(m) <= budget and measure(m + 1) > budget (or
    m == limit), given measure(1) <= budget. Memory grows about linearly with the batch, so
    the next probe interpolates between the bounds (bisecting when that stalls): a handful of
    compiles instead of one per candidate."""
    lo, hi = 1, limit
    if measure(hi) <= budget:
        return hi
    last_side, same_side = None, 0
    while hi - lo > 1:
        b_lo, b_hi = measure(lo), measure(hi)
        if same_side >= 2 or b_hi <= b_lo:
            guess = (lo + hi) // 2
        else:
            guess = lo + int((budget - b_lo) * (hi - lo) // (b_hi - b_lo))
        guess = min(max(guess, lo + 1), hi - 1)
        side = "lo" if measure(guess) <= budget else "hi"
        if side == "lo":
            lo = guess
        else:
            hi = guess
        same_side = same_side + 1 if side == last_side else 1
        last_side = side
    return lo


def find_batch_size(
    module: Any,
    data: Any,
    strategy: Any = "auto",
    memory_budget: int | None = None,
    *,
    max_batch_size: int | None = None,
    **engine_kwargs: Any,
) -> BatchSizeEstimate:
    """The largest global batch size (a multiple of the data-parallel size) whose training
    step, compiled exactly as `Engine(strategy=strategy, **engine_kwargs).fit` would compile
    it, needs at most `memory_budget` bytes on each device.

    Args:
        module: a `TrainModule` instance or a zero-argument factory (built only abstractly).
        data: training data as for `fit` (arrays, or an iterable of batches) - only the shape
            and dtype of a row are used; array data also caps the batch at its row count.
        strategy: as for `Engine`.
        memory_budget: bytes per device; default the devices' allocator limit (`bytes_limit`
            from `memory_stats()`); required where that is not reported (CPU).
        max_batch_size: the largest batch to consider (default: rows of array data, else
            2**20).
        engine_kwargs: other `Engine` arguments that change the step (devices, precision,
            callbacks with in-step transforms, gradient_clip_val, ...).
    """
    engine_kwargs.setdefault("enable_progress_bar", False)
    engine_kwargs.setdefault("logger", False)
    engine_kwargs.setdefault("max_steps", 1)
    engine = Engine(strategy=strategy, **engine_kwargs)
    row, rows = _row_spec(data)
    plan = engine.plan(module)
    strategy_ = engine.strategy
    dp, micro = strategy_.data_parallel_size, engine.micro_batches

    if memory_budget is None:
        memory_budget = min_device_memory(engine.devices)
        if memory_budget is None:
            raise ValueError(
                f"find_batch_size: {engine.devices[0].platform} devices do not report their "
                "memory limit (memory_stats() is None). Pass memory_budget=<bytes per device>, "
                "e.g. memory_budget=2 * 2**30."
            )
    if not isinstance(memory_budget, int | float) or memory_budget <= 0:
        raise ValueError(
            f"memory_budget must be a positive number of bytes, got {memory_budget!r}."
        )
    cap = max_batch_size if max_batch_size is not None else (rows // micro if rows else 2**20)
    if cap < dp:
        raise ValueError(
            f"find_batch_size: the largest batch allowed is {cap}, below the {dp} data-parallel "
            f"devices of strategy {strategy_.name!r} (the batch must be a multiple of {dp}). "
            "Pass a larger max_batch_size or more data, or use fewer devices."
        )

    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        plan.abstract,
        plan.shardings,
    )
    measured: dict[int, int] = {}
    treedef = jax.tree.structure(plan.abstract)
    leaves = treedef.flatten_up_to(abstract_state)

    def dispatch_program(batch: Any) -> Any:
        """What fit compiles as `compiled_step`: a one-step fused dispatch over a stacked host
        batch, with the metric accumulator (batches fed from the host)."""
        meta: dict = {}
        step = leaves_train_step(plan, strategy_, engine.transforms, meta, engine.precision)
        shardings = treedef.flatten_up_to(plan.shardings)
        fused = FusedStep(step, meta, strategy_, shardings, log_every=engine.log_every_n_steps)
        names = jax.eval_shape(step, leaves, batch)[1]
        acc = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=strategy_.replicated()),
            jax.eval_shape(lambda: empty_metrics(meta, dict.fromkeys(names))),
        )
        xs = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                (1, *x.shape), x.dtype, sharding=stacked_sharding(strategy_, x.ndim + 1)
            ),
            batch,
        )
        return fused.compile(1, leaves, acc, xs)

    def bytes_for(batch_size: int) -> int:
        if batch_size not in measured:
            batch = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    (batch_size * micro, *x.shape),
                    x.dtype,
                    sharding=strategy_.batch_sharding(len(x.shape) + 1),
                ),
                row,
            )
            with jax.set_mesh(strategy_.mesh):
                measured[batch_size] = compiled_memory(dispatch_program(batch))
        return measured[batch_size]

    if bytes_for(dp) > memory_budget:
        raise ValueError(
            f"find_batch_size: even the smallest batch ({dp}, one row per data-parallel device) "
            f"needs {bytes_for(dp)} bytes per device, above memory_budget={int(memory_budget)}. "
            "Shard the state (e.g. strategy='fsdp'), use a lower precision, or more devices."
        )
    best = dp * search_largest(lambda m: bytes_for(dp * m), memory_budget, cap // dp)
    return BatchSizeEstimate(best, bytes_for(best))
