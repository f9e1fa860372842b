"""Activation rematerialisation for a `Stack`: which policy, and how a layer body is wrapped.

`Stack(..., remat=...)` takes False (store every activation for the backward pass), True
(store only each layer's input and recompute the rest), a `jax.checkpoint_policies` name such
as "dots_saveable" (keep matmul outputs, recompute the cheap elementwise parts) or any policy
function. The layer body is wrapped in `jax.checkpoint`, so the numbers do not change, only
what the compiled step keeps in memory between forward and backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

#: `jax.checkpoint_policies` entries that are policies themselves (the others build one).
POLICY_NAMES = (
    "dots_saveable",
    "nothing_saveable",
    "everything_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)


@dataclasses.dataclass(frozen=True)
class Remat:
    """A resolved remat setting: `name` for reports, `policy` for `jax.checkpoint` (None:
    save nothing but the layer's inputs)."""

    name: str
    policy: Callable[..., bool] | None = None

    def wrap(self, fn: Callable) -> Callable:
        """`fn` recomputed in the backward pass under this policy (inside a scan, so CSE is
        left on: the scan already keeps XLA from merging the recomputation away)."""
        return jax.checkpoint(fn, policy=self.policy, prevent_cse=False)


def resolve_remat(value: Any) -> Remat | None:
    """The `Remat` for a `Stack(remat=...)` argument, None when off; a clear error otherwise."""
    if value is False or value is None:
        return None
    if value is True:
        return Remat("full")
    if isinstance(value, str):
        if value not in POLICY_NAMES:
            raise ValueError(
                f"Stack(remat={value!r}) is not a known policy name. Use True (recompute "
                f"everything but each layer's input), one of {', '.join(POLICY_NAMES)}, or a "
                "policy function such as jax.checkpoint_policies.save_only_these_names('x')."
            )
        return Remat(value, getattr(jax.checkpoint_policies, value))
    if callable(value):
        return Remat(getattr(value, "__name__", type(value).__name__), value)
    raise TypeError(
        f"Stack(remat=...) expects False, True, a policy name ({', '.join(POLICY_NAMES)}) or a "
        f"jax.checkpoint policy function, got {type(value).__name__}."
    )


def describe_remat(remat: Remat | None) -> str:
    """A short label for the model summary."""
    if remat is None:
        return "off"
    if remat.name == "full":
        return "on (recompute all but each layer's input)"
    return remat.name
