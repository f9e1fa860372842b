"""What `configure_optimizers` returns, checked: an optax transformation, or Lightning's dict
form `{"optimizer": tx, "lr_schedule": schedule}` naming the learning-rate schedule (so
`LearningRateMonitor()` can log it without arguments); and whether `tx.update` takes the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import optax

DICT_KEYS = ("optimizer", "lr_schedule")


class OptimizerConfig(NamedTuple):
    """The optimizer and, when `configure_optimizers` named it, its learning-rate schedule."""

    tx: optax.GradientTransformation
    lr_schedule: Callable[[Any], Any] | None = None


def _type_error(owner: str, got: Any) -> TypeError:
    return TypeError(
        f"{owner}.configure_optimizers() must return an optax GradientTransformation (e.g. "
        "`return optax.adam(1e-3)`) or a dict {'optimizer': tx, 'lr_schedule': schedule}, got "
        f"{type(got).__name__}."
    )


def parse_optimizers(owner: str, out: Any) -> OptimizerConfig:
    """`configure_optimizers()`'s return value as an `OptimizerConfig`, or a clear error."""
    if isinstance(out, optax.GradientTransformation):
        return OptimizerConfig(out)
    if not isinstance(out, dict):
        raise _type_error(owner, out)
    unknown = sorted(set(out) - set(DICT_KEYS))
    if unknown:
        hint = " (meshfit calls it 'lr_schedule')" if "lr_scheduler" in unknown else ""
        raise ValueError(
            f"{owner}.configure_optimizers() returned a dict with unknown key(s) {unknown}"
            f"{hint}; expected {{'optimizer': tx, 'lr_schedule': schedule}} ('lr_schedule' "
            "optional)."
        )
    tx, schedule = out.get("optimizer"), out.get("lr_schedule")
    if not isinstance(tx, optax.GradientTransformation):
        raise _type_error(owner, tx) from None
    if schedule is not None and not callable(schedule):
        raise TypeError(
            f"{owner}.configure_optimizers()['lr_schedule'] must be a function of the update "
            f"count (an optax schedule, e.g. optax.cosine_decay_schedule(1e-3, 1000)), got "
            f"{type(schedule).__name__}."
        )
    return OptimizerConfig(tx, schedule)


def accepts_value(tx: optax.GradientTransformation) -> bool:
    """True when `tx.update` takes `value=` (e.g. `optax.contrib.reduce_on_plateau`, or any
    optax chain / extra-args transformation, which forwards it to the parts that use it)."""
    try:
        parameters = inspect.signature(tx.update).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: do not guess
        return False
    return any(p.name == "value" or p.kind is p.VAR_KEYWORD for p in parameters)
