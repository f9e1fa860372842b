"""The train state: one pytree holding everything a run needs to continue."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """Parameters, other module variables, optimizer state, step and in-step transform states.

    - `params`: the module's `nnx.Param` variables (what the optimizer updates);
    - `rest`: every other module variable (batch statistics, RNG stream state, ...);
    - `opt_state`: the optax state (its step counter drives schedules);
    - `step`: optimizer updates applied;
    - `extra`: state of in-step transforms (loss scale, ...), keyed by transform.
    """

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt_state: Any
    extra: dict[str, Any]


class LiveState:
    """The one owner of a run's live train state: the flat leaves the jitted step takes and
    returns, and their treedef. The `TrainState` pytree is rebuilt only when read (`tree`):
    rebuilding its nnx Variables costs the host ~0.1 ms, too much for every step."""

    def __init__(self, state: TrainState):
        self.treedef = jax.tree.structure(state)
        self.leaves: list[jax.Array] = self.treedef.flatten_up_to(state)
        self._tree: TrainState | None = state

    @property
    def tree(self) -> TrainState:
        if self._tree is None:
            self._tree = self.treedef.unflatten(self.leaves)
        return self._tree

    def advance(self, leaves: list[jax.Array]) -> None:
        """Take the leaves a step returned (the old ones were donated to it)."""
        self.leaves, self._tree = leaves, None

    def replace(self, state: TrainState) -> None:
        """Swap in a whole new state of the same structure (e.g. restored from a checkpoint)."""
        self.leaves, self._tree = self.treedef.flatten_up_to(state), state

    def deleted(self) -> bool:
        """True when the leaves were donated to a step whose result was never taken."""
        return any(x.is_deleted() for x in self.leaves if isinstance(x, jax.Array))
