"""Orbax plumbing: the checkpoint format, saving (`CheckpointWriter`) and finding checkpoints.

A training checkpoint is one step directory written by an orbax `CheckpointManager` with two
items: `train`, the arrays (`params`: the module's parameters; `state`: step, other module
variables with PRNG keys stored as raw `key_data`, optimizer state, in-step transform states),
and `meta` (JSON: the data position, every callback's `state_dict`, the unlogged metric window,
the optimizer's state layout). One array item, not two: each orbax item has a fixed cost, and
this halves the time a save blocks the loop. Arrays are restored onto abstract targets that
carry this run's shardings, so a checkpoint written under one strategy reads back resharded
under another (`meshfit.restore`). Nothing is pickled: loading runs no code.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as ocp_keep

from meshfit.engine.data import resume as data_resume
from meshfit.engine.state import TrainState

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

FORMAT_VERSION = 2  # 1: `params` and `state` as separate array items
ITEMS = ("train", "meta")


def item_handlers() -> dict[str, Any]:
    """Handlers for the items, so metadata and partial restores work in a fresh process."""
    return {"train": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run (missing, mismatched, from another optimizer)."""


# ---------------------------------------------------------------------------- pytree helpers
def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_savable(tree: Any) -> Any:
    """Typed PRNG keys -> their raw uint32 `key_data` (typed keys do not serialize)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_savable(tree: Any, template: Any) -> Any:
    """Rebuild typed PRNG keys where `template` holds them (same impl, same sharding)."""

    def back(raw, like):
        if not _is_key(like):
            return raw
        key = jax.random.wrap_key_data(raw, impl=jax.random.key_impl(like))
        return jax.device_put(key, like.sharding) if hasattr(like, "sharding") else key

    return jax.tree.map(back, tree, template)


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding targets: orbax reads each array straight into this layout."""

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(spec, tree)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """`a/b/c` path -> (shape, dtype) for every leaf; nnx `.value` suffixes are dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":
            names = names[:-1]
        out["/".join(names)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def tree_mismatches(saved: dict, expected: dict) -> list[str]:
    """Readable lines for every path missing, unexpected or of another shape/dtype."""
    lines = []
    for path in sorted(set(saved) | set(expected)):
        if path not in saved:
            lines.append(f"  {path}: expected {_fmt(expected[path])}, missing in checkpoint")
        elif path not in expected:
            lines.append(f"  {path}: in checkpoint {_fmt(saved[path])}, not in this run")
        elif saved[path] != expected[path]:
            lines.append(
                f"  {path}: checkpoint {_fmt(saved[path])}, this run {_fmt(expected[path])}"
            )
    return lines


def _fmt(entry: tuple[tuple[int, ...], str]) -> str:
    return f"{entry[1]}{list(entry[0])}"


def optimizer_signature(opt_state: Any) -> str:
    """The optimizer state's layout (node types and leaf paths): differs between optimizers."""
    types: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            types.append(type(node).__name__)
        for child in node if isinstance(node, list | tuple) else ():
            visit(child)

    visit(opt_state)
    paths = ",".join(sorted(flat_shapes(opt_state)))
    return f"{'+'.join(types) or type(opt_state).__name__}|{paths}"


def _describe_signature(sig: str) -> str:
    return sig.split("|", 1)[0]


# ---------------------------------------------------------------------------- saving
def _position(engine: Engine, position: tuple[int, int] | None) -> tuple[int, int]:
    return position if position is not None else (engine.current_epoch, engine.batch_idx)


def _window_state(engine: Engine) -> dict[str, Any]:
    """The train metrics not yet logged (so the resumed run's next log averages the same steps)."""
    window = getattr(engine, "_train_window", None)
    if window is None or not len(window):
        return {"steps": [], "weights": []}
    steps = jax.device_get(window._steps)
    return {
        "steps": [{k: float(np.asarray(v)) for k, v in s.items()} for s in steps],
        "weights": list(window._weights),
    }


def checkpoint_meta(engine: Engine, position: tuple[int, int] | None, extra: dict) -> dict:
    epoch, batch_idx = _position(engine, position)
    callbacks: dict[str, Any] = {}
    for cb in engine.callbacks:
        state = cb.state_dict()
        if state:
            callbacks[cb.state_key] = state
    return {
        "format": FORMAT_VERSION,
        "global_step": int(engine.global_step),
        "current_epoch": int(epoch),
        "batch_idx": int(batch_idx),
        "seed": engine.seed,
        "callbacks": callbacks,
        "callback_metrics": dict(engine.callback_metrics),
        "metric_window": _window_state(engine),
        "optimizer": optimizer_signature(engine.state.opt_state),
        # the training iterator's state per process (None: the position is enough)
        "data": data_resume.data_state(engine, (epoch, batch_idx)),
        **extra,
    }


def _state_tree(state: TrainState) -> dict[str, Any]:
    """Everything but the parameters, as a plain dict (the `state` item)."""
    return {
        "step": state.step,
        "rest": state.rest,
        "opt_state": state.opt_state,
        "extra": state.extra,
    }


def train_item(state: TrainState) -> dict[str, Any]:
    """The `train` item: `params` and the savable rest of the state."""
    return {"params": state.params, "state": to_savable(_state_tree(state))}


class CheckpointWriter:
    """One orbax `CheckpointManager` over `directory`, saving asynchronously and atomically.

    Keeps the newest checkpoint (`keep_last`) plus, when `monitor` is set, the best `top_k` by
    its score; `top_k=-1` keeps every monitored one. Orbax writes into a temporary directory and
    renames it when complete, and deletes old steps only after the new one is committed.
    """

    def __init__(
        self,
        directory: str,
        *,
        monitor: str | None = None,
        mode: str = "min",
        top_k: int = 1,
        keep_last: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        self.monitor, self.mode, self.top_k, self.keep_last = monitor, mode, top_k, keep_last
        self._manager: ocp.CheckpointManager | None = None
        self.last_blocking_s = 0.0

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options(), item_handlers=item_handlers()
            )
        return self._manager

    def _options(self) -> ocp.CheckpointManagerOptions:
        n = None if self.top_k < 0 else self.top_k
        policies: list[Any] = []
        if self.keep_last:
            policies.append(ocp_keep.LatestN(n=1))
        if self.monitor is not None:
            policies.append(
                ocp_keep.BestN(
                    get_metric_fn=lambda m: m["score"],
                    reverse=self.mode == "min",
                    n=n,
                    keep_checkpoints_without_metrics=False,
                )
            )
            return ocp.CheckpointManagerOptions(
                best_fn=lambda m: m["score"],
                best_mode=self.mode,
                preservation_policy=ocp_keep.AnyPreservationPolicy(policies),
                enable_async_checkpointing=True,
            )
        if not self.keep_last:
            policies.append(ocp_keep.LatestN(n=n) if n is not None else ocp_keep.PreserveAll())
        elif n is None or n > 1:
            policies = [ocp_keep.LatestN(n=n) if n is not None else ocp_keep.PreserveAll()]
        return ocp.CheckpointManagerOptions(
            preservation_policy=ocp_keep.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        engine: Engine,
        *,
        position: tuple[int, int] | None = None,
        score: float | None = None,
    ) -> bool:
        """Start an async save of the engine's state at `engine.global_step`. Returns False when
        that step is already saved. Blocks only for the device->host copy (and a previous save)."""
        import time

        step = int(engine.global_step)
        if step in self.manager.all_steps():
            return False
        arrays = train_item(engine.state)
        metrics = None
        meta_extra: dict[str, Any] = {}
        if self.monitor is not None:
            meta_extra["monitor"] = {"name": self.monitor, "mode": self.mode, "score": score}
            if score is not None and math.isfinite(score):
                metrics = {"score": float(score)}
        meta = checkpoint_meta(engine, position, meta_extra)
        t0 = time.perf_counter()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                train=ocp.args.PyTreeSave(arrays),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )
        self.last_blocking_s = time.perf_counter() - t0
        return True

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


# ---------------------------------------------------------------------------- finding checkpoints
def default_dir(engine: Engine) -> str:
    return os.path.join(engine.default_root_dir, "checkpoints")


def checkpoint_dir(engine: Engine) -> str:
    """Where this engine's `ModelCheckpoint` writes (or the default `<root>/checkpoints`)."""
    for cb in engine.callbacks:
        directory = getattr(cb, "resolved_dirpath", None)
        if callable(directory):
            return directory(engine)
    return default_dir(engine)


def _reader(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
        item_handlers=item_handlers(),
    )


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The `meta` item, after checking this meshfit can read the checkpoint's format."""
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    version = meta.get("format", 0)
    if version != FORMAT_VERSION:
        where = os.path.join(str(manager.directory), str(step))
        raise CheckpointError(
            f"Checkpoint {where} has format {version}; this meshfit reads format "
            f"{FORMAT_VERSION}. "
            + (
                "Upgrade meshfit to resume from it."
                if version > FORMAT_VERSION
                else "It was written by an older meshfit: resume it with that version, or "
                "read its `params` item with orbax and meshfit.load_weights' layout."
            )
        )
    return meta


def train_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """Shapes and dtypes of the `train` item: {"params": ..., "state": ...}."""
    return manager.item_metadata(step)["train"]


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and all(
        os.path.isdir(os.path.join(path, item)) for item in ITEMS
    )


def resolve(engine: Engine, ckpt_path: str | os.PathLike) -> tuple[str, int] | None:
    """(manager directory, step) for "last", "best" or a path; None for "last" with nothing yet."""
    ckpt_path = os.fspath(ckpt_path)
    if ckpt_path in ("last", "best"):
        directory = checkpoint_dir(engine)
        steps = _reader(directory).all_steps() if os.path.isdir(directory) else []
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
            return directory, max(steps)
        return directory, _best_step(directory, steps)
    path = os.path.abspath(ckpt_path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"Checkpoint path {ckpt_path!r} does not exist. Pass a step directory (e.g. "
            f"{os.path.join(default_dir(engine), '<step>')}), a checkpoint directory (its newest "
            "complete step is used), or ckpt_path='last' / 'best'."
        )
    if _is_step_dir(path):
        return os.path.dirname(path), int(os.path.basename(path))
    steps = _reader(path).all_steps() if os.path.isdir(path) else []
    if not steps:
        raise CheckpointError(
            f"{ckpt_path!r} holds no complete meshfit checkpoint (expected step directories "
            "like '<dir>/100' containing 'params', 'state' and 'meta')."
        )
    return path, max(steps)


def _best_step(directory: str, steps: list[int]) -> int:
    manager = _reader(directory)
    scored = []
    for step in steps:
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
