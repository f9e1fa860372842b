"""`CSVLogger`: `metrics.csv` (a `step` column, one column per metric) and `hparams.yaml`."""

from __future__ import annotations

import csv
import io
import os
from typing import TYPE_CHECKING, Any

import yaml

from meshfit.callbacks.logger import Logger, next_version_dir

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine


def _row_bytes(columns: list[str], row: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([row.get(c, "") for c in columns])
    return buf.getvalue().encode()


class MetricsTable:
    """One CSV file, one row per step: rows are appended; metrics that arrive for the step of
    the last row join that row (only that line is rewritten); a new metric adds a column (the
    file is rewritten with the wider header). Values are written exactly (`repr` of floats)."""

    def __init__(self, path: str):
        self.path = path
        self.columns: list[str] = ["step"]
        self._last: dict[str, Any] | None = None
        self._last_start = 0  # byte offset where the last row begins
        self._size = 0
        if os.path.exists(path):
            rows = self.read()
            if rows:
                self.columns = list(rows[0])
            self._rewrite(rows)
        self._file = open(path, "ab")  # noqa: SIM115 (kept open for the run)
        if self._size == 0:
            self._append(_row_bytes(self.columns, dict(zip(self.columns, self.columns))))
            self._file.flush()

    def read(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps > `step` (a resumed run logs them again)."""
        self._file.close()
        self._rewrite([r for r in self.read() if int(r["step"]) <= step])
        self._file = open(self.path, "ab")  # noqa: SIM115

    def add(self, step: int, metrics: dict[str, float]) -> None:
        merge = self._last is not None and int(self._last["step"]) == step
        row = {**self._last, **metrics} if merge else {"step": step, **metrics}
        new = [name for name in metrics if name not in self.columns]
        if new:  # a wider header: rewrite the file (rare: a metric's first appearance)
            self.columns += new
            self._file.close()
            rows = self.read()
            self._rewrite([*(rows[:-1] if merge else rows), row])
            self._file = open(self.path, "ab")  # noqa: SIM115
        else:
            if merge:
                self._file.truncate(self._last_start)
                self._size = self._last_start
            else:
                self._last_start = self._size
            self._append(_row_bytes(self.columns, row))
            self._last = row
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    # ------------------------------------------------------------------ file mechanics
    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._size += len(data)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Write header + `rows` to a temporary file and move it into place (atomic)."""
        tmp = self.path + ".tmp"
        chunks = [_row_bytes(self.columns, dict(zip(self.columns, self.columns)))]
        chunks += [_row_bytes(self.columns, r) for r in rows]
        with open(tmp, "wb") as f:
            f.write(b"".join(chunks))
        os.replace(tmp, self.path)
        self._size = sum(map(len, chunks))
        self._last_start = self._size - len(chunks[-1]) if rows else self._size
        self._last = dict(rows[-1]) if rows else None


class CSVLogger(Logger):
    """Writes `save_dir/version_N/metrics.csv` (default `<default_root_dir>/csv`): a `step`
    column and one column per metric, one row per step, columns added as new metrics appear;
    and the hyperparameters to `hparams.yaml` beside it (Lightning's layout).

    A resumed run appends to the same file after dropping the rows logged after the checkpoint.
    """

    def __init__(self, save_dir: str | None = None):
        super().__init__()
        self.save_dir = save_dir
        self.table: MetricsTable | None = None

    @property
    def metrics_path(self) -> str | None:
        return None if self.log_dir is None else os.path.join(self.log_dir, "metrics.csv")

    def open(self, engine: Engine, resume_step: int | None) -> None:
        self.save_dir = self.save_dir or os.path.join(engine.default_root_dir, "csv")
        if self.log_dir is None or resume_step is None:
            self.log_dir = next_version_dir(self.save_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        self.table = MetricsTable(self.metrics_path)
        if resume_step is not None:
            self.table.truncate_after(resume_step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        with open(os.path.join(self.log_dir, "hparams.yaml"), "w") as f:
            yaml.safe_dump(params, f, sort_keys=False)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.table.add(step, metrics)

    def finalize(self, status: str) -> None:
        self.table.close()
        self.table = None
