"""Damaged checkpoints: a step whose arrays or metadata fail to read is reported by path, and
`ckpt_path="last"` falls back to the newest step that reads completely.

A file can be cut short on disk after orbax committed the step (a full disk, a copy that
stopped, bit rot), so "committed" does not mean "readable". Every read goes into fresh arrays;
the caller swaps them in only after a whole step was read on every process, so a run never
resumes from partly read state.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from jax.experimental import multihost_utils

from meshfit.engine.checkpoint.format import CheckpointError
from meshfit.engine.processes import distributed

T = TypeVar("T")


def root_cause(exc: BaseException, limit: int = 300) -> str:
    """The innermost error of a chain, in one line: TensorStore's own message names the array
    and the byte range, while the wrapping exceptions mostly print its spec."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    text = " ".join(str(exc).split()) or "no message"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class DamagedCheckpoint(CheckpointError):
    """A checkpoint step whose arrays or metadata could not be read completely."""

    def __init__(self, path: str, reason: str, original: BaseException | None = None):
        self.path, self.reason = path, reason
        self.original = original  # the raw error, kept for debugging (not chained: too long)
        super().__init__(
            f"Checkpoint {path} is damaged: its arrays or metadata could not be read ({reason}). "
            "Resume from another step (ckpt_path='last' skips damaged ones), or delete it."
        )


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
    """Report any failure while reading `path` (TensorStore, JSON, OS errors) as a
    `DamagedCheckpoint` naming it; other `CheckpointError`s (a mismatched module) pass."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise DamagedCheckpoint(path, root_cause(exc), exc) from None


def all_read(ok: bool) -> bool:
    """True when every process read its part of the step: one small collective with several
    processes, so all of them take the same step or all fall back together."""
    if distributed.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


def first_readable(
    directory: str,
    steps: Sequence[int],
    read: Callable[[int], T],
    *,
    fallback: bool,
    what: str = "fit",
) -> tuple[int, T]:
    """(step, read(step)) for the first of `steps` (newest first) that reads completely on every
    process. Without `fallback` only the first is tried and a damaged one raises
    `DamagedCheckpoint`; with it, damaged steps are skipped with a warning naming them, and
    `CheckpointError` lists them all when none reads."""
    damaged: list[DamagedCheckpoint] = []
    for step in steps:
        path = os.path.join(directory, str(step))
        error: DamagedCheckpoint | None = None
        try:
            value = read(step)
        except DamagedCheckpoint as exc:
            error = exc
        if not all_read(error is None) and error is None:
            error = DamagedCheckpoint(path, "another process could not read its part")
        if error is None:
            if damaged:
                names = "; ".join(f"{d.path} ({d.reason})" for d in damaged)
                warnings.warn(
                    f"{what}(ckpt_path='last'): skipping damaged checkpoint(s) {names}; "
                    f"using {path}, the newest one that reads completely.",
                    stacklevel=4,
                )
            return step, value
        if not fallback:
            raise error
        damaged.append(error)
    listing = "\n".join(f"  {d.path}: {d.reason}" for d in damaged)
    raise CheckpointError(
        f"{what}(ckpt_path='last'): no checkpoint in {directory} reads completely:\n{listing}\n"
        "Delete the damaged step directories to start from scratch, or restore them from a copy."
    )
