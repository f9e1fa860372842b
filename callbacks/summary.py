"""`ModelSummary`: at fit start, what the model is and where it lives.

A table of parameters (path, shape, dtype, partition spec, bytes per device), totals, the mesh
and its device grid, and the compiled step's memory per device and FLOPs per step. Built from
shapes, shardings and XLA's static analyses only: it never waits for the device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from meshfit.engine.hardware import compiled_flops, compiled_memory, format_bytes
from meshfit.engine.hooks import Callback
from meshfit.engine.remat import describe_remat
from meshfit.engine.stack import Stack
from meshfit.engine.trees import max_device_bytes, path_str, shard_bytes


def _spec(x: Any) -> str:
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    return "replicated" if spec is None or not any(spec) else str(tuple(spec))


def parameter_rows(params: Any) -> list[tuple[str, str, str, str, int, int]]:
    """(path, shape, dtype, spec, bytes per device, elements) for every parameter array."""
    rows = []
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]:
        x = leaf.get_value() if is_var(leaf) else leaf
        rows.append(
            (
                path_str(keypath),
                str(tuple(x.shape)),
                str(x.dtype),
                _spec(x),
                shard_bytes(x),
                int(np.prod(x.shape)),
            )
        )
    return rows


def stack_rows(module: Any) -> list[str]:
    """One line per `Stack` in `module`: its path, layer count and remat policy."""
    if module is None:
        return []
    return [
        f"{'/'.join(map(str, path)) or '<root>'} ({node.num_layers} layers, remat "
        f"{describe_remat(node.remat)})"
        for path, node in nnx.iter_graph(module)
        if isinstance(node, Stack)
    ]


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]


def summarize(engine: Any, max_rows: int = 40) -> str:
    """The summary text for a fitted-or-starting engine (state built, step compiled)."""
    state, mesh, strategy = engine.state, engine.mesh, engine.strategy
    rows = parameter_rows(state.params)
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 1]
    lines = [f"[meshfit] model summary: {type(engine.module).__name__}"]
    lines += _table(
        [(p, s, d, sp, format_bytes(b)) for p, s, d, sp, b, _ in shown],
        ("parameter", "shape", "dtype", "partition spec", "bytes/device"),
        right={4},
    )
    if len(shown) < len(rows):
        lines.append(f"... and {len(rows) - len(shown)} more parameters")
    count = sum(r[5] for r in rows)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    state_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    lines.append(
        f"parameters: {count:,} ({format_bytes(total)} total, "
        f"{format_bytes(max_device_bytes(state.params))} per device); "
        f"train state with optimizer: {format_bytes(state_total)} total, "
        f"{format_bytes(max_device_bytes(state))} per device"
    )
    axes = ", ".join(f"{n}={s}" for n, s in mesh.shape.items())
    grid = np.vectorize(lambda d: d.id)(mesh.devices)
    lines.append(f"mesh: ({axes}) axis names {tuple(mesh.axis_names)}; device ids {grid.tolist()}")
    lines.append(f"strategy: {strategy.describe(engine.layout)}")
    stacks = stack_rows(engine.module)
    if stacks:
        lines.append(f"stacks: {'; '.join(stacks)}")
    memory, flops = compiled_memory(engine.compiled_step), compiled_flops(engine.compiled_step)
    lines.append(
        f"compiled step: {format_bytes(memory)} per device, "
        f"{'unknown' if flops is None else f'{flops:.3g}'} FLOPs per step"
    )
    if engine.dispatch_summary:
        data = "on the device" if engine.data_on_device_active else "fed from the host"
        lines.append(f"dispatch: {engine.dispatch_summary}; training data {data}")
    return "\n".join(lines)


class ModelSummary(Callback):
    """Print the model summary at fit start on process 0 (on by default:
    `Engine(enable_model_summary=False)` turns it off). The text is kept in `self.text`."""

    def __init__(self, max_rows: int = 40):
        self.max_rows = max_rows
        self.text: str | None = None

    def on_fit_start(self, engine: Any) -> None:
        if engine.is_global_zero:
            self.text = summarize(engine, self.max_rows)
            print(self.text, flush=True)


def default_model_summary(enabled: bool, callbacks: list[Callback]) -> list[Callback]:
    """The ModelSummary the engine adds by default (unless one is given or it is disabled)."""
    if not enabled or any(isinstance(cb, ModelSummary) for cb in callbacks):
        return []
    return [ModelSummary()]
