"""How many dispatched steps may queue ahead of the host, and the queue that enforces it."""

from __future__ import annotations

import collections
import time
from typing import Any

import jax

QUEUED_BATCH_BYTES = 256 * 2**20  # what steps queued on one CPU device may hold in batches


def in_flight_limit(
    max_in_flight: int | None, mesh: jax.sharding.Mesh, log_every: int, batch_bytes: int
) -> int:
    """`max_in_flight`, or the default: 2, except on a single CPU device, where steps queue up
    to the next metric read (at most 64, and 256 MiB of batches). There each wait for the
    device costs compute, as host and device share the cores: ~2.5% of a 17 ms step with 2 in
    flight, none when the host waits only at metric reads."""
    if max_in_flight is not None:
        return max_in_flight
    devices = mesh.devices
    if devices.size == 1 and devices.flat[0].platform == "cpu":
        by_memory = QUEUED_BATCH_BYTES // max(batch_bytes, 1)
        return max(2, min(log_every, 64, by_memory))
    return 2


class InFlight:
    """Bounds how many dispatched steps are queued ahead of the host: past `limit`, wait for
    the oldest (bounds memory, and avoids the XLA:CPU collective stall of long queues)."""

    def __init__(self, limit: int, timed: bool = False):
        """`timed`: keep `step_seconds` (the planner of "auto" reads it)."""
        self.limit, self.queue, self.queued, self.timed = limit, collections.deque(), 0, timed
        self.step_seconds: float | None = None  # device time per step, as last timed
        self._done_at: float | None = None  # when the last wait on a busy device ended

    def add(self, outputs: Any, steps: int = 1) -> None:
        """Queue a dispatch of `steps` steps (a fused one counts each of its steps); past the
        limit, wait for the oldest dispatches (never the newest)."""
        self.queue.append((outputs, steps))
        self.queued += steps
        while self.queued > self.limit and len(self.queue) > 1:
            oldest, n = self.queue.popleft()
            self.queued -= n
            busy = self.timed and not all(x.is_ready() for x in jax.tree.leaves(oldest))
            jax.block_until_ready(oldest)
            if self.timed:
                self._timed(n, busy)

    def _timed(self, steps: int, busy: bool) -> None:
        """Time the dispatch just waited for, when this wait and the previous one both found
        the device busy: it then ran this dispatch from the end of that wait until now."""
        now = time.perf_counter()
        if busy and self._done_at is not None:
            self.step_seconds = (now - self._done_at) / steps
        self._done_at = now if busy else None
