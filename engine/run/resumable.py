"""What a fit's checkpoint holds and how a fit resumes from one: the train state and host
meta of a snapshot, the restore before the first batch, the save on preemption. `FitRun`
binds these as its methods (`run.snapshot(...)`, `run.restore(found)`)."""

from __future__ import annotations

from typing import Any

from meshfit.engine.checkpoint import find
from meshfit.engine.checkpoint.format import host_meta
from meshfit.engine.checkpoint.preemption import Preempted
from meshfit.engine.checkpoint.restore import restore_state
from meshfit.engine.checkpoint.writer import CheckpointWriter
from meshfit.engine.data.resume import data_state, restore_data_state
from meshfit.engine.state import TrainState


def snapshot(run: Any, position: tuple[int, int] | None = None) -> tuple[TrainState, dict]:
    """The train state and the host meta a checkpoint holds (`position`: the data position
    to resume at, default the current one)."""
    engine = run.engine
    position = position or (engine.current_epoch, engine.batch_idx)
    callbacks = {cb.state_key: s for cb in engine.callbacks if (s := cb.state_dict())}
    state = run.state
    meta = host_meta(
        global_step=engine.global_step,
        position=position,
        seed=run.config.seed,
        callbacks=callbacks,
        callback_metrics=engine.callback_metrics,
        metric_window=run.window.state_dict(),
        opt_state=state.opt_state,
        data=data_state(run.train_loader, position),
        **({"config": engine.run_config} if engine.run_config is not None else {}),
    )
    return state, meta


def restore(run: Any, found: find.Resume) -> dict[str, Any]:
    """Load a checkpoint: the state (resharded onto this run's layout), the data position
    and the loader's state, the callback states, the latest metrics. Returns its meta (the
    unlogged metric window is loaded once the window exists)."""
    state, meta = restore_state(found, run.state)
    run.live.replace(state)
    engine = run.engine
    engine.global_step = int(meta["global_step"])
    engine.current_epoch = int(meta["current_epoch"])
    engine.batch_idx = int(meta["batch_idx"])
    engine.callback_metrics.update(meta.get("callback_metrics", {}))
    states = meta.get("callbacks", {})
    for cb in engine.callbacks:
        if cb.state_key in states:
            cb.load_state_dict(states[cb.state_key])
    restore_data_state(run.train_loader, meta)  # this process's data-iterator state
    return meta


def checkpoint_and_exit(run: Any) -> None:
    """Preemption: save a complete checkpoint at this step boundary, then raise `Preempted`."""
    engine = run.engine
    for cb in engine.callbacks:
        if hasattr(cb, "save_for_preemption"):
            path = cb.save_for_preemption(engine)  # saved and finished
            break
    else:
        writer = CheckpointWriter(find.default_dir(run.config.default_root_dir))
        writer.save(engine.global_step, *run.snapshot())
        writer.close()  # waits for the write to finish
        path = writer.directory
    raise Preempted(engine.global_step, path)
