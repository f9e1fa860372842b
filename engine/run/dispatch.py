"""How many steps the next dispatch fuses, the host batches grouped per dispatch, and the
per-step views fused batch hooks receive."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from meshfit.engine.data import HostBatch
from meshfit.engine.hooks import Callback, overridden_hooks
from meshfit.engine.step.fused import stacked_sharding
from meshfit.strategies.base import Strategy

#: The most steps "auto" fuses into one dispatch (bounded by the log cadence unless the
#: dispatch closes log windows itself).
AUTO_MAX = 128
#: With the data on the device and dispatches spanning log windows, "auto" goes past
#: AUTO_MAX up to this many steps, as long as a dispatch runs at most about DISPATCH_SECONDS
#: (timed by the in-flight queue): the host still sees a step (SIGTERM, the progress bar, the
#: clock of max_time) a few times a second, and a tiny model pays its per-dispatch host work
#: once an epoch rather than once every 128 steps.
AUTO_MAX_ON_DEVICE = 4096
DISPATCH_SECONDS = 0.25
#: The one intermediate size for remainders of a large K.
REMAINDER = 8


def fusion_blockers(callbacks: Sequence[Callback]) -> list[str]:
    """Callbacks whose batch hooks need one dispatch per step (not declared `fusion_safe`)."""
    batch = {"on_train_batch_start", "on_train_batch_end"}
    return [
        type(cb).__name__
        for cb in callbacks
        if batch & set(overridden_hooks(cb)) and not getattr(cb, "fusion_safe", False)
    ]


def observers_only(callbacks: Sequence[Callback]) -> bool:
    """Whether every callback with a log or batch-end hook declares `observes_only`: a log
    step's host work may then wait for the next dispatch, and "auto" dispatches may span log
    windows (closed on the device, each logged at its step afterwards)."""
    hooks = {"on_log", "on_train_batch_end"}
    return all(
        getattr(cb, "observes_only", False) for cb in callbacks if hooks & set(overridden_hooks(cb))
    )


def epoch_boundaries_observed(callbacks: Sequence[Callback]) -> bool:
    """Whether an epoch's end and the next one's start may run after the next epoch's first
    dispatch is queued: no callback replays batch starts, and every one with an epoch hook
    declares `observes_only`."""
    hooks = {"on_train_epoch_start", "on_train_epoch_end"}
    for cb in callbacks:
        overridden = set(overridden_hooks(cb))
        if "on_train_batch_start" in overridden:
            return False
        if hooks & overridden and not getattr(cb, "observes_only", False):
            return False
    return True


def spans_logs(setting: int | str, callbacks: Sequence[Callback]) -> bool:
    """Whether a fit's dispatches close log windows themselves (see `observers_only`)."""
    return setting == "auto" and observers_only(callbacks)


def dispatch_sizes(k_max: int) -> list[int]:
    """The only K values ever compiled: k_max, 1, and 8 when k_max > 16 (a remainder runs as
    the largest of them that fits). Each size is one more compile at fit start-up, which
    dominates short fits (examples/digits.py), so there are few."""
    sizes = {k_max, 1} | ({REMAINDER} if k_max > 2 * REMAINDER else set())
    return sorted(sizes, reverse=True)


class DispatchPlanner:
    """The next dispatch's K: as large as allowed without passing a step the host must see
    (log, validation, `max_steps`, the epoch's end, the multi-process preemption check, and
    every callback's `next_host_step`)."""

    def __init__(
        self,
        setting: int | str,
        engine: Any,
        callbacks: Sequence[Callback],
        any_size: bool = False,
        spans_logs: bool = False,
        **cadence: int | None,
    ):
        """`any_size`: every K up to the largest runs as one program (else a remainder runs
        as the largest compiled size that fits, `dispatch_sizes`). `spans_logs`: the dispatch
        closes log windows itself (`FusedStep(log_every=...)`), so logs do not bound K."""
        config = engine.config
        self.blockers = fusion_blockers(callbacks) if setting == "auto" else []
        # K past AUTO_MAX while the steps are timed fast enough (`next_k`)
        self.timed = setting == "auto" and spans_logs and any_size and not self.blockers
        if setting == "auto":
            cap = AUTO_MAX if spans_logs else min(config.log_every_n_steps, AUTO_MAX)
            if self.timed:
                cap = min(AUTO_MAX_ON_DEVICE, engine.num_training_batches or AUTO_MAX_ON_DEVICE)
            k_max = 1 if self.blockers else cap
        else:
            k_max = int(setting)
        self.k_max, self.setting = k_max, setting
        self.sizes = list(range(k_max, 0, -1)) if any_size else dispatch_sizes(k_max)
        self.callbacks = [cb for cb in callbacks if _declares_next_host_step(cb)]
        logs = [] if spans_logs else [config.log_every_n_steps]
        self.every = logs + [v for v in cadence.values() if v]
        self.max_steps = config.max_steps

    def describe(self) -> str:
        """One line for the model summary: K, and which callback forced K=1."""
        if self.blockers:
            return (
                f"1 step per dispatch: {', '.join(self.blockers)} override(s) the batch hooks "
                "without declaring fusion_safe"
            )
        return f"up to {self.k_max} steps per dispatch (steps_per_dispatch={self.setting!r})"

    def next_k(
        self, engine: Any, left_in_epoch: int | None, step_seconds: float | None = None
    ) -> int:
        """`step_seconds`: the device time of a step, as last timed (`InFlight`), or None."""
        g = engine.global_step
        limit = self.k_max if left_in_epoch is None else min(self.k_max, left_in_epoch)
        if self.timed:  # past AUTO_MAX only as far as DISPATCH_SECONDS holds
            fits = AUTO_MAX if step_seconds is None else int(DISPATCH_SECONDS / step_seconds)
            limit = min(limit, max(AUTO_MAX, fits))
        for every in self.every:
            limit = min(limit, every - g % every)
        if self.max_steps is not None:
            limit = min(limit, self.max_steps - g)
        for cb in self.callbacks:
            step = cb.next_host_step(engine)
            if step is not None and step > g:
                limit = min(limit, step - g)
        return next((k for k in self.sizes if k <= limit), 0) if limit > 0 else 0


def _declares_next_host_step(cb: Callback) -> bool:
    return type(cb).next_host_step is not Callback.next_host_step


class HostGroups:
    """Up to K host batches of an epoch, stacked (leading axis K) and placed in one transfer."""

    def __init__(self, batches: Iterator[HostBatch], strategy: Strategy):
        self.source, self.strategy = iter(batches), strategy
        self.held: HostBatch | None = None
        self.multi = jax.process_count() > 1
        self._shardings: dict[Any, list[Any]] = {}

    def take(self, k: int) -> tuple[Any, int, Any]:
        """(stacked device batch, how many steps, one step's shapes); 0 steps at the end."""
        group: list[HostBatch] = []
        while len(group) < k:
            batch = self.held or next(self.source, None)
            self.held = None
            if batch is None:
                break
            if group and (batch.global_size, batch.sharded) != (
                group[0].global_size,
                group[0].sharded,
            ):
                self.held = batch  # another shape: the next dispatch starts with it
                break
            group.append(batch)
        if not group:
            return None, 0, None
        first = group[0]
        leaves, treedef = jax.tree.flatten(first.local)
        if len(group) == 1:
            stacked = [np.asarray(x)[None] for x in leaves]
        else:
            cols = zip(*(jax.tree.leaves(b.local) for b in group), strict=True)
            stacked = [np.stack(c) for c in cols]
        arrays = self._place(stacked, first, len(group))
        shapes = jax.tree.unflatten(
            treedef,
            [jax.ShapeDtypeStruct((first.global_size, *np.shape(x)[1:]), x.dtype) for x in leaves],
        )
        return jax.tree.unflatten(treedef, arrays), len(group), shapes

    def _place(self, stacked: list[np.ndarray], first: HostBatch, k: int) -> list[Any]:
        key = (tuple(x.ndim for x in stacked), first.sharded)
        shardings = self._shardings.get(key)
        if shardings is None:
            replicated = self.strategy.replicated()
            shardings = self._shardings[key] = [
                stacked_sharding(self.strategy, x.ndim) if first.sharded else replicated
                for x in stacked
            ]
        if not self.multi:
            return jax.device_put(stacked, shardings)  # one transfer for the whole dispatch
        return [
            jax.make_array_from_process_local_data(
                s, x, (k, first.global_size, *x.shape[2:]) if x.ndim > 1 else x.shape
            )
            for s, x in zip(shardings, stacked, strict=True)
        ]


class StepOutputs(Mapping):
    """Step `j`'s metrics out of a dispatch's stacked ones, sliced only when read."""

    def __init__(self, stacked: dict[str, jax.Array], j: int):
        self.stacked, self.j = stacked, j

    def __getitem__(self, name: str) -> jax.Array:
        return self.stacked[name][self.j]

    def __iter__(self):
        return iter(self.stacked)

    def __len__(self) -> int:
        return len(self.stacked)


def replay_starts(hooks: Any, engine: Any, g0: int, b0: int, k: int, shapes: Any) -> None:
    """`on_train_batch_start` for each of `k` steps of a dispatch from step `g0` / batch `b0`,
    with that step's counters; the counters are left as they were."""
    for j in range(k):
        engine.global_step, engine.batch_idx = g0 + j, b0 + j
        hooks("on_train_batch_start", shapes, b0 + j)
    engine.global_step, engine.batch_idx = g0, b0


def replay_ends(
    hooks: Any,
    engine: Any,
    g0: int,
    b0: int,
    k: int,
    shapes: Any,
    per_step: Any,
    logs: dict[int, Any],
) -> None:
    """After a dispatch of `k` steps from step `g0` / batch `b0`: each step's
    `on_train_batch_end` with its counters and outputs, preceded at a log step `j` by `logs[j]()`
    (the window it closed); the counters are left as they were."""
    now = engine.global_step, engine.batch_idx
    ends = hooks.has("on_train_batch_end")
    for j in range(k) if ends else sorted(logs):
        engine.global_step, engine.batch_idx = g0 + j + 1, b0 + j + 1
        if j in logs:
            logs[j]()
        if ends:
            hooks("on_train_batch_end", StepOutputs(per_step, j), shapes, b0 + j)
    engine.global_step, engine.batch_idx = now
