"""Checks for the debug and run-control arguments (Lightning's names): `fast_dev_run`,
`limit_train_batches`, `limit_val_batches`, `overfit_batches`, `max_time`,
`check_val_every_n_epoch`. Pure functions over values; `EngineConfig` calls them.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

#: The keys a `max_time` dict may have (those of `datetime.timedelta`, Lightning's form).
TIME_KEYS = ("days", "hours", "minutes", "seconds")
_DDHHMMSS = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})\s*$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


def check_batch_limit(name: str, value: Any, allow_zero: bool) -> None:
    """None, an int (batches; >= 1, or >= 0 with `allow_zero`) or a float fraction in (0, 1]
    ([0, 1] with `allow_zero`)."""
    if value is None:
        return
    low = 0 if allow_zero else 1
    if _is_int(value) and value >= low:
        return
    if _is_float(value) and (value >= 0.0 if allow_zero else value > 0.0) and value <= 1.0:
        return
    zero = " (0 or 0.0 turns it off)" if allow_zero else ""
    raise ValueError(
        f"{name}={value!r}: use None (every batch), an int >= {low} (that many batches per "
        f"epoch) or a float in {'[0.0' if allow_zero else '(0.0'}, 1.0] (that fraction of the "
        f"epoch's batches){zero}."
    )


def check_overfit_batches(value: Any) -> None:
    if (_is_int(value) and value >= 0) or (_is_float(value) and 0.0 <= value <= 1.0):
        return
    raise ValueError(
        f"overfit_batches={value!r}: use 0 (off), an int N >= 1 (train and validate on the first "
        "N training batches, unshuffled) or a float in (0.0, 1.0] (that fraction of them)."
    )


def fast_dev_batches(value: Any) -> int:
    """How many batches `fast_dev_run` runs (0: off); True means 1."""
    if value is True:
        return 1
    if value is False or value is None:
        return 0
    if _is_int(value) and value >= 0:
        return value
    raise ValueError(
        f"fast_dev_run={value!r}: use False (off), True (1 batch) or an int N >= 1 (N training "
        "and N validation batches, then stop)."
    )


def fast_dev_overrides(n: int) -> dict[str, Any]:
    """The settings `fast_dev_run=n` replaces (Lightning's): n training and n validation batches
    in one epoch, validation once at its end, no sanity check, no loggers."""
    return {
        "max_steps": n,
        "max_epochs": 1,
        "limit_train_batches": n,
        "limit_val_batches": n,
        "val_every_n_steps": None,
        "check_val_every_n_epoch": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
    }


def max_time_delta(value: Any) -> datetime.timedelta | None:
    """`max_time` as a timedelta: "DD:HH:MM:SS", a `timedelta` or a dict of its days / hours /
    minutes / seconds; None means no limit. Anything else, or a limit <= 0, is an error."""
    if value is None:
        return None
    how = (
        'use "DD:HH:MM:SS" (e.g. "00:12:00:00" for 12 hours), a datetime.timedelta, or a dict '
        'like {"hours": 12, "minutes": 30} (keys: ' + ", ".join(TIME_KEYS) + ")"
    )
    if isinstance(value, datetime.timedelta):
        delta = value
    elif isinstance(value, str):
        match = _DDHHMMSS.match(value)
        if not match:
            raise ValueError(f"max_time={value!r} is not a duration: {how}.")
        days, hours, minutes, seconds = map(int, match.groups())
        delta = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(TIME_KEYS))
        bad = [k for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int | float)]
        if unknown or bad or not value:
            raise ValueError(f"max_time={value!r} is not a duration: {how}.")
        delta = datetime.timedelta(**value)
    else:
        raise TypeError(f"max_time must be a duration, got {type(value).__name__}: {how}.")
    if delta <= datetime.timedelta(0):
        raise ValueError(f"max_time={value!r} is {delta}: use a positive duration ({how}).")
    return delta


def check_val_epochs(every: Any, val_every_n_steps: int | None) -> None:
    """`check_val_every_n_epoch`: a positive int or None (None: only `val_every_n_steps`)."""
    if every is None:
        if val_every_n_steps is None:
            raise ValueError(
                "check_val_every_n_epoch=None validates only every val_every_n_steps, which is "
                "unset, so validation would never run. Set val_every_n_steps=N, or turn "
                "validation off with limit_val_batches=0."
            )
        return
    if not _is_int(every) or every < 1:
        raise ValueError(
            f"check_val_every_n_epoch={every!r}: use a positive int (validate at the end of "
            "every n-th epoch) or None (only every val_every_n_steps)."
        )
    if every > 1 and val_every_n_steps is not None:
        raise ValueError(
            f"check_val_every_n_epoch={every} with val_every_n_steps={val_every_n_steps}: with "
            "val_every_n_steps set, validation runs at those steps only (not at epoch ends). "
            "Use one of them."
        )
