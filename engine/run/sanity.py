"""Sanity validation: a few validation batches before the first training step, so a broken
`validation_step` fails in seconds (not after an epoch) and the eval step is compiled up front."""

from __future__ import annotations

import itertools
from typing import Any

import jax


def _one_shot(loader: Any) -> bool:
    """True for an iterator that a sanity pass would consume (its batches would be lost)."""
    data = getattr(loader, "data", None)
    return data is not None and not isinstance(data, tuple | list | dict) and iter(data) is data


def sanity_check(run: Any, steps: int) -> None:
    """Run `steps` validation batches of `run.val_loader` and wait for them; nothing is logged
    and no hook runs. A failure gets a note saying it came from the sanity check."""
    loader = run.val_loader
    if not steps or loader is None or _one_shot(loader):
        return
    params, rest = run.eval_params(), run.state.rest
    try:
        for batch in itertools.islice(loader.epoch(0, 0, run.placer.rows_for), steps):
            jax.block_until_ready(run.eval_step(params, rest, run.placer.place(batch)))
    except Exception as exc:
        exc.add_note(
            f"[meshfit] raised while validating {steps} batch(es) before the first training "
            "step (Engine(num_sanity_val_steps=...); 0 turns this check off)."
        )
        raise
