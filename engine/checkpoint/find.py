"""Finding checkpoints: "last", "best" or a path -> `Resume` (directory, step, fallbacks)."""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

from meshfit.engine.checkpoint.damage import reading
from meshfit.engine.checkpoint.format import CheckpointError, is_step_dir, read_meta, reader


class Resume(NamedTuple):
    """A step of the checkpoint directory `directory` to read, and, for "last", the older steps
    to fall back to when it turns out to be damaged (newest first)."""

    directory: str
    step: int
    fallback: tuple[int, ...] = ()


def default_dir(root_dir: str) -> str:
    """Where checkpoints go without `ModelCheckpoint(dirpath=...)`: `<root>/checkpoints`."""
    return os.path.join(root_dir, "checkpoints")


def resolve(ckpt_path: str | os.PathLike, directory: str, root_dir: str) -> Resume | None:
    """Where to read for "last" or "best" (among the checkpoints in `directory`, where this
    run's go) or a path; None for "last" with nothing there yet. Only "last" falls back."""
    ckpt_path = os.fspath(ckpt_path)
    if ckpt_path in ("last", "best"):
        steps = reader(directory).all_steps() if os.path.isdir(directory) else []
        if not steps:
            if ckpt_path == "best":
                raise CheckpointError(
                    f"fit(ckpt_path='best'): no complete checkpoint in {directory}. Train with "
                    "ModelCheckpoint(monitor=...) first, or pass ckpt_path='last' / a path."
                )
            warnings.warn(
                f"fit(ckpt_path='last'): no checkpoint in {directory} yet; starting from scratch.",
                stacklevel=3,
            )
            return None
        if ckpt_path == "last":
            newest_first = sorted(steps, reverse=True)
            return Resume(directory, newest_first[0], tuple(newest_first[1:]))
        return Resume(directory, _best_step(directory, steps))
    path = os.path.abspath(ckpt_path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"Checkpoint path {ckpt_path!r} does not exist. Pass a step directory (e.g. "
            f"{os.path.join(default_dir(root_dir), '<step>')}), a checkpoint directory (its newest "
            "complete step is used), or ckpt_path='last' / 'best'."
        )
    if is_step_dir(path):
        return Resume(os.path.dirname(path), int(os.path.basename(path)))
    steps = reader(path).all_steps() if os.path.isdir(path) else []
    if not steps:
        raise CheckpointError(
            f"{ckpt_path!r} holds no complete meshfit checkpoint (expected step directories "
            "like '<dir>/100' containing 'params', 'state' and 'meta')."
        )
    return Resume(path, max(steps))


def _best_step(directory: str, steps: list[int]) -> int:
    manager = reader(directory)
    scored = []
    for step in steps:
        with reading(os.path.join(directory, str(step))):
            monitor = read_meta(manager, step).get("monitor") or {}
        score = monitor.get("score")
        if score is not None and math.isfinite(score):
            scored.append((score if monitor["mode"] == "min" else -score, step))
    if not scored:
        raise CheckpointError(
            f"fit(ckpt_path='best'): no checkpoint in {directory} records a monitored metric. "
            "Use ModelCheckpoint(monitor='val_loss', ...) or resume with ckpt_path='last'."
        )
    return min(scored)[1]
