"""`CheckpointWriter`: one orbax `CheckpointManager` saving train states asynchronously and
atomically, with the retention policy (the newest, the best k by a monitored score).

Every orbax call runs on one writer thread of the lowest scheduling priority (and the threads
orbax starts from it inherit it): on a small machine a save's ~40 ms of CPU then runs in
the cores' idle time instead of taking it from the training step. The loop waits only for what
it must: the host copy of the state (the next step donates its buffers), the previous save's
commit, and, with several processes, orbax's barriers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_keep

from meshfit.engine.checkpoint.format import item_handlers, train_item
from meshfit.engine.checkpoint.packing import pack
from meshfit.engine.state import TrainState


class CheckpointWriter:
    """One orbax `CheckpointManager` over `directory`, saving asynchronously and atomically.

    Keeps the newest checkpoint (`keep_last`) plus, when `monitor` is set, the best `top_k` by
    its score; `top_k=-1` keeps every monitored one; steps that are multiples of
    `keep_every_n_steps` are never deleted. Orbax writes into a temporary directory and
    renames it when complete, and deletes old steps only after the new one is committed.
    """

    def __init__(
        self,
        directory: str,
        *,
        monitor: str | None = None,
        mode: str = "min",
        top_k: int = 1,
        keep_last: bool = True,
        keep_every_n_steps: int | None = None,
    ):
        self.directory = os.path.abspath(directory)
        self.monitor, self.mode, self.top_k, self.keep_last = monitor, mode, top_k, keep_last
        self.keep_every_n_steps = keep_every_n_steps
        self._manager: ocp.CheckpointManager | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._saving: concurrent.futures.Future | None = None  # the last save's orbax call
        self._committed: concurrent.futures.Future | None = None  # ... and its commit
        self._steps: set[int] | None = None  # the steps saved (on disk, or being written)
        self.last_blocking_s = 0.0

    def _call(self, fn: Callable[[ocp.CheckpointManager], Any]) -> concurrent.futures.Future:
        """Run `fn(manager)` on the writer thread, after every call before it."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="meshfit-checkpoint", initializer=_lower_priority
            )
        return self._thread.submit(lambda: fn(self._open()))

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options(), item_handlers=item_handlers()
            )
        return self._manager

    def _options(self) -> ocp.CheckpointManagerOptions:
        n = None if self.top_k < 0 else self.top_k
        policies: list[Any] = []
        if self.keep_every_n_steps:  # permanent snapshots
            policies.append(ocp_keep.EveryNSteps(interval_steps=self.keep_every_n_steps))
        if self.keep_last:
            policies.append(ocp_keep.LatestN(n=1))
        if self.monitor is not None:
            policies.append(
                ocp_keep.BestN(
                    get_metric_fn=lambda m: m["score"],
                    reverse=self.mode == "min",
                    n=n,
                    keep_checkpoints_without_metrics=False,
                )
            )
            return ocp.CheckpointManagerOptions(
                best_fn=lambda m: m["score"],
                best_mode=self.mode,
                preservation_policy=ocp_keep.AnyPreservationPolicy(policies),
                enable_async_checkpointing=True,
            )
        if not self.keep_last or n is None or n > 1:  # the newest n (n=None: every one)
            policies = [p for p in policies if not isinstance(p, ocp_keep.LatestN)]
            policies.append(ocp_keep.LatestN(n=n) if n is not None else ocp_keep.PreserveAll())
        return ocp.CheckpointManagerOptions(
            preservation_policy=ocp_keep.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True,
        )

    def latest_step(self) -> int | None:
        return self._call(lambda m: m.latest_step()).result()

    def save(
        self, step: int, state: TrainState, meta: dict[str, Any], score: float | None = None
    ) -> bool:
        """Start an async save of `state` and `meta` as `step`. Returns False when that step is
        already saved. Blocks only for the device->host copy (and a previous save); the small
        replicated leaves are packed (`packing.py`), their layout goes into the meta. Errors of
        the write surface at the next `save`, `wait` or `close`."""
        step = int(step)
        if self._steps is None:
            self._steps = set(self._call(lambda m: m.all_steps()).result())
        if step in self._steps:
            return False
        t0 = time.perf_counter()
        # The previous save must be committed first (as orbax's own save would wait): saves
        # never queue up, and one in progress means the one before it is on disk.
        if self._committed is not None:
            self._committed.result()
        self._raise_failed_save()
        arrays, layout = pack(train_item(state))
        meta = {**meta, "packed": layout}
        metrics = None
        if self.monitor is not None:
            meta = {**meta, "monitor": {"name": self.monitor, "mode": self.mode, "score": score}}
            if score is not None and math.isfinite(score):
                metrics = {"score": float(score)}
        args = ocp.args.Composite(train=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta))
        self._saving = self._call(lambda m: m.save(step, args=args, metrics=metrics, force=True))
        self._committed = self._call(lambda m: m.wait_until_finished())
        self._steps.add(step)
        if jax.process_count() > 1 or any(
            isinstance(x, jax.Array) for x in jax.tree.leaves(arrays)
        ):
            # Until orbax has copied the device arrays to the host, and has passed its barriers
            # across processes (device collectives, which must not interleave with the steps').
            self._saving.result()
        self.last_blocking_s = time.perf_counter() - t0
        return True

    def _raise_failed_save(self) -> None:
        saving, self._saving, self._committed = self._saving, None, None
        if saving is not None:
            saving.result()

    def wait(self) -> None:
        """Until every save so far is written and committed (raises a failed save's error)."""
        if self._thread is not None:
            self._call(lambda m: m.wait_until_finished()).result()
            self._raise_failed_save()

    def close(self) -> None:
        if self._thread is None:
            return
        try:
            self._call(lambda m: m.close()).result()
            self._raise_failed_save()
        finally:
            self._thread.shutdown()
            self._thread = self._manager = self._steps = None


def _lower_priority() -> None:
    """The lowest priority short of idle-only (nice 19, per thread on Linux; a no-op where it
    fails): the step's threads win the cores, yet this one, which holds the GIL while it runs
    orbax's Python, is never starved for long (SCHED_IDLE could leave the loop waiting on it)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


# ---------------------------------------------------------------------------- finding checkpoints
