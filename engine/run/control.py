"""What a fit's run-control settings do to its data: batches per epoch (`limit_train_batches`,
`overfit_batches`, `fast_dev_run`), the validation loader (`limit_val_batches`; the first
training batches under `overfit_batches`), and which epochs end in validation
(`check_val_every_n_epoch`). The fit loop needs nothing else: a shorter epoch is just a
smaller `num_training_batches`, which already bounds every dispatch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from meshfit.engine.data import HostBatch, MicroBatchWindows, RowsFn
from meshfit.engine.processes import distributed


class LimitedLoader:
    """The first `n` batches of `loader` in every pass (everything else is the loader's)."""

    def __init__(self, loader: Any, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return self.n

    def epoch(
        self, epoch: int, start: int = 0, rows_for: RowsFn | None = None
    ) -> Iterator[HostBatch]:
        return itertools.islice(self.loader.epoch(epoch, start, rows_for), max(0, self.n - start))

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (e.g. while copying)
            raise AttributeError(name)
        return getattr(self.loader, name)


def length(loader: Any) -> int | None:
    """Batches per pass, or None for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def resolve_limit(limit: int | float | None, total: int | None, name: str, what: str) -> int | None:
    """Batches a pass runs under `limit` (None: all `total`; an int: at most that many; a float:
    that fraction of `total`, rounded down). A fraction needs a known length, and a positive
    fraction must give at least one batch."""
    if limit is None:
        return total
    if isinstance(limit, float):
        if total is None:
            raise ValueError(
                f"{name}={limit} is a fraction of the epoch, but {what} has no length (an "
                f"iterable of batches). Pass an int number of batches, e.g. {name}=10."
            )
        n = int(limit * total)
        if n == 0 and limit > 0:
            raise ValueError(
                f"{name}={limit} of the {total} batches of {what} is {limit * total:.2f}, less "
                f"than one batch. Use a larger fraction, or an int (e.g. {name}=1)."
            )
        return n
    return limit if total is None else min(limit, total)


def unshuffle(loader: Any) -> None:
    """Make a training loader read its rows in order (`overfit_batches`: the same batches in
    every epoch). Iterables keep their own order."""
    inner = loader.loader if isinstance(loader, MicroBatchWindows) else loader
    if hasattr(inner, "shuffle"):
        inner.shuffle = False


def fit_loaders(
    config: Any, make: Callable[..., Any], train_data: Any, val_data: Any, micro_batches: int
) -> tuple[Any, Any, int | None]:
    """(training loader, validation loader or None, training batches per epoch) for one fit;
    `make(data, name, train=...)` builds a loader."""
    train = make(train_data, "train_data", train=True)
    total = length(train)
    if config.overfit_batches:
        total = resolve_limit(config.overfit_batches, total, "overfit_batches", "train_data")
        unshuffle(train)
        # validation reads the same rows: each training batch is `micro_batches` eval batches
        val = LimitedLoader(make(train_data, "train_data", train=False), total * micro_batches)
    else:
        val = None if val_data is None else make(val_data, "val_data")
    n_train = resolve_limit(config.limit_train_batches, total, "limit_train_batches", "train_data")
    if val is not None and config.limit_val_batches is not None:
        what = "the overfit batches" if config.overfit_batches else "val_data"
        n_val = resolve_limit(config.limit_val_batches, length(val), "limit_val_batches", what)
        val = None if n_val == 0 else LimitedLoader(val, n_val)
    return train, val, n_train


def validates_at_epoch_end(config: Any, val_loader: Any, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) ends in a validation pass: without `val_every_n_steps`,
    every `check_val_every_n_epoch`-th epoch."""
    if val_loader is None or config.val_every_n_steps is not None:
        return False
    return (epoch + 1) % config.check_val_every_n_epoch == 0


def announce(config: Any, n_train: int | None, val_loader: Any, val_data: Any) -> None:
    """One line (process 0) when a debug mode changes what the fit runs."""
    if not distributed.is_main_process():
        return
    if config.fast_dev_run:
        n_val = 0 if val_loader is None else length(val_loader)
        print(
            f"[meshfit] fast_dev_run={config.fast_dev_run}: {n_train} training and {n_val} "
            "validation batch(es), no sanity check, no checkpoints, no loggers; then stop.",
            flush=True,
        )
    if config.overfit_batches:
        ignored = "; val_data is not used" if val_data is not None else ""
        print(
            f"[meshfit] overfit_batches={config.overfit_batches}: training and validating on "
            f"the first {n_train} training batches, unshuffled, in every epoch{ignored}.",
            flush=True,
        )
