"""`HookTable`: the callbacks' overridden hooks, indexed once per run, called in order."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

from meshfit.engine.hooks import Callback, overridden_hooks
from meshfit.engine.run.timing import PhaseTimer


class HookTable:
    """Calls `hook(engine, *args)` on every callback that overrides it (and only those)."""

    def __init__(self, callbacks: Sequence[Callback], engine: Any, timings: PhaseTimer):
        self.engine, self.timings = engine, timings
        self.fns: dict[str, list[Callable]] = collections.defaultdict(list)
        for cb in callbacks:
            for hook in overridden_hooks(cb):
                self.fns[hook].append(getattr(cb, hook))

    def has(self, *hooks: str) -> bool:
        return any(self.fns[h] for h in hooks)

    def __call__(self, hook: str, *args: Any) -> None:
        fns = self.fns[hook]
        if not fns:
            return
        if not self.timings.enabled:  # the common case: no timing context on the hot path
            for fn in fns:
                fn(self.engine, *args)
            return
        with self.timings.phase("callbacks"):
            for fn in fns:
                fn(self.engine, *args)
