"""`meshfit plot`: a PNG of the train and validation curves of a run, one line per metric.

    meshfit plot runs/csv/version_0 [--out curves.png]     # a CSVLogger directory
    meshfit plot runs/csv/version_0/metrics.csv
    meshfit plot runs/tensorboard/version_0                 # TensorBoard event files
    meshfit plot runs                                       # the newest log directory below

Metrics that differ only by a `val_` / `train_` prefix share a panel. Needs matplotlib
(`pip install 'meshfit[loggers]'`).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import math
import os
import struct
import sys
from typing import Any

Curves = dict[str, list[tuple[int, float]]]
EVENTS = "events.out.tfevents.*"
PREFIXES = ("val_", "val/", "train_", "train/")


def read_csv(path: str) -> Curves:
    """{metric: [(step, value), ...]} from a CSVLogger `metrics.csv` (empty cells skipped)."""
    curves: Curves = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            for name, cell in row.items():
                if cell not in ("", None):
                    curves.setdefault(name, []).append((step, float(cell)))
    return curves


def _records(path: str):
    """The payloads of a TFRecord file (length, length crc, data, data crc)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        if pos + 12 + length + 4 > len(data):
            break  # a record still being written
        yield data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4


def _file_order(path: str) -> tuple[int, str]:
    parts = os.path.basename(path).split(".")
    stamp = parts[3] if len(parts) > 3 and parts[3].isdigit() else "0"
    return int(stamp), path


def read_tensorboard(log_dir: str) -> Curves:
    """Scalars from the event files in `log_dir`, in the order written, as TensorBoard shows
    them: a session restart at step S (`purge_step`) hides what was logged at steps >= S."""
    from tensorboardX.proto import event_pb2

    curves: Curves = {}
    for path in sorted(glob.glob(os.path.join(log_dir, EVENTS)), key=_file_order):
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                for name, points in curves.items():
                    curves[name] = [(s, v) for s, v in points if s < event.step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    curves.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {name: points for name, points in curves.items() if points}


def _log_dirs(root: str) -> list[str]:
    found = []
    for directory, _, files in os.walk(root):
        if "metrics.csv" in files or glob.glob(os.path.join(directory, EVENTS)):
            found.append(directory)
    return found


def load_curves(source: str) -> tuple[Curves, str]:
    """The curves of `source` (a metrics.csv, an event file, or a directory holding either;
    for a directory above several runs, the most recently written one) and what was read."""
    if os.path.isfile(source):
        if source.endswith(".csv"):
            return read_csv(source), source
        if fnmatch.fnmatch(os.path.basename(source), EVENTS):
            return read_tensorboard(os.path.dirname(source) or "."), os.path.dirname(source)
        raise ValueError(f"meshfit plot: {source!r} is neither a metrics.csv nor an event file.")
    if not os.path.isdir(source):
        raise FileNotFoundError(f"meshfit plot: {source!r} does not exist.")
    candidates = _log_dirs(source)
    if not candidates:
        raise FileNotFoundError(
            f"meshfit plot: no metrics.csv or TensorBoard event files under {source!r}. Pass a "
            "CSVLogger or TensorBoardLogger version directory (e.g. runs/csv/version_0), or a "
            "metrics.csv."
        )
    newest = max(candidates, key=lambda d: max(os.path.getmtime(p) for p in _files(d)))
    csv_path = os.path.join(newest, "metrics.csv")
    if os.path.exists(csv_path):
        return read_csv(csv_path), csv_path
    return read_tensorboard(newest), newest


def _files(directory: str) -> list[str]:
    csv_path = os.path.join(directory, "metrics.csv")
    return [csv_path] if os.path.exists(csv_path) else glob.glob(os.path.join(directory, EVENTS))


def panels(names: list[str]) -> dict[str, list[str]]:
    """Metrics grouped by their name without a train/val prefix, in order of appearance."""
    groups: dict[str, list[str]] = {}
    for name in names:
        base = next((name[len(p) :] for p in PREFIXES if name.startswith(p)), name)
        groups.setdefault(base or name, []).append(name)
    return groups


def render(curves: Curves, out: str, title: str = "") -> Any:
    """Draw one panel per metric group, one line per metric, and save a PNG to `out`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError(
            "meshfit plot needs matplotlib: pip install 'meshfit[loggers]' (or matplotlib)."
        ) from exc
    groups = panels(list(curves))
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flat
    for ax, (base, names) in zip(axes, groups.items()):
        for name in names:
            steps, values = zip(*sorted(curves[name]))
            few = len(steps) <= 30
            ax.plot(steps, values, marker="o" if few else None, markersize=3, label=name)
        ax.set_title(base)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes:  # panels left over in the grid
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.savefig(out, dpi=110)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshfit plot", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a log directory (CSV or TensorBoard) or a metrics.csv")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    args = p.parse_args(argv)
    try:
        curves, origin = load_curves(args.source)
    except (FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if not curves:
        print(f"meshfit plot: {origin} holds no metrics yet.", file=sys.stderr)
        return 2
    render(curves, args.out, title=origin)
    print(f"meshfit plot: wrote {args.out} ({len(curves)} metrics from {origin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
