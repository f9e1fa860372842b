"""Process helpers (rank-0 output and per-process data go through these)."""

from __future__ import annotations

import jax


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on the one process that writes logs, progress bars and reports."""
    return process_index() == 0


def local_process_index() -> int:
    import os

    return int(os.environ.get("LOCAL_RANK", os.environ.get("MESHFIT_LOCAL_RANK", "0")))


def is_local_main_process() -> bool:
    """True on the first process of each machine."""
    return local_process_index() == 0
