"""`CheckpointWriter`: one orbax `CheckpointManager` saving train states asynchronously and
atomically, with the retention policy (the newest, the best k by a monitored score)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

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
        self.last_blocking_s = 0.0

    @property
    def manager(self) -> ocp.CheckpointManager:
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
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, meta: dict[str, Any], score: float | None = None
    ) -> bool:
        """Start an async save of `state` and `meta` as `step`. Returns False when that step is
        already saved. Blocks only for the device->host copy (and a previous save); the small
        replicated leaves are packed (`packing.py`), their layout goes into the meta."""
        step = int(step)
        if step in self.manager.all_steps():
            return False
        t0 = time.perf_counter()
        arrays, layout = pack(train_item(state))
        meta = {**meta, "packed": layout}
        metrics = None
        if self.monitor is not None:
            meta = {**meta, "monitor": {"name": self.monitor, "mode": self.mode, "score": score}}
            if score is not None and math.isfinite(score):
                metrics = {"score": float(score)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                train=ocp.args.PyTreeSave(arrays),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )
        self.last_blocking_s = time.perf_counter() - t0
        return True

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


# ---------------------------------------------------------------------------- finding checkpoints
