"""`MLflowLogger`: metrics, parameters and (optionally) checkpoints to an MLflow run."""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import TYPE_CHECKING, Any

from meshfit.callbacks.logger import Logger, require

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

RUN_STATUS = {"success": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_INVALID = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's allowed characters in names
MAX_PARAM_CHARS = 6000
MAX_METRICS_PER_CALL = 1000


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a/b` keys (MLflow parameters are flat strings)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MLflowLogger(Logger):
    """Logs to an MLflow run: metrics at the optimizer step, hyperparameters as parameters.

    Args:
        experiment_name: created if it does not exist.
        tracking_uri: e.g. "file:/path/mlruns", "sqlite:///mlflow.db", "http://host:5000".
            Default: `$MLFLOW_TRACKING_URI`, else a file store in `<default_root_dir>/mlruns`.
            For a `file:` store this sets MLFLOW_ALLOW_FILE_STORE=true unless it is set
            (MLflow 3 only warns that the file store is in maintenance mode).
        run_name: the run's display name.
        log_checkpoints: copy each committed ModelCheckpoint directory into the run's
            artifacts under `checkpoints/<step>`.

    Writes are batched: one `log_batch` at most every `write_interval_s` (5 s; set the
    attribute to change it), since each call costs ~1.4 ms of CPU with the file store (it
    re-reads the run's metadata) and a round trip with a tracking server.

    The run id is saved in checkpoints, so a resumed fit continues the same run; steps the
    run already holds (logged after the checkpoint, before the interruption) are not logged
    twice, since MLflow cannot delete metric values (a resume is exact, so they are the same).
    """

    write_interval_s = 5.0

    def __init__(
        self,
        experiment_name: str = "meshfit",
        tracking_uri: str | None = None,
        run_name: str | None = None,
        log_checkpoints: bool = False,
    ):
        require("mlflow", "MLflowLogger", "mlflow")
        super().__init__()
        self.experiment_name, self.tracking_uri, self.run_name = (
            experiment_name,
            tracking_uri,
            run_name,
        )
        self.log_checkpoints = log_checkpoints
        self.client: Any = None
        self.run_id: str | None = None
        self._logged_through: dict[str, int] = {}  # on resume: the last step held per metric
        self._renamed: set[str] = set()

    def open(self, engine: Engine, resume_step: int | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            uri = "file:" + os.path.abspath(os.path.join(engine.default_root_dir, "mlruns"))
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.save_dir, self.client = uri, MlflowClient(tracking_uri=uri)
        self._logged_through = {}
        if resume_step is not None and self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self._logged_through[key] = max(m.step for m in history)
        else:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(self.experiment_name)
            )
            run = self.client.create_run(experiment_id, run_name=self.run_name)
            self.run_id = run.info.run_id
        self.log_dir = self.client.get_run(self.run_id).info.artifact_uri

    def _key(self, name: str) -> str:
        key = _INVALID.sub("_", name)
        if key != name and name not in self._renamed:
            self._renamed.add(name)
            warnings.warn(
                f"MLflowLogger: metric {name!r} is logged as {key!r} (MLflow names allow only "
                "letters, digits, '_', '-', '.', ' ' and '/').",
                stacklevel=2,
            )
        return key

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        self.client.log_batch(
            self.run_id,
            params=[Param(self._key(k), str(v)[:MAX_PARAM_CHARS]) for k, v in flat.items()],
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.write_rows([(step, metrics)])

    def write_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """All rows in one `log_batch` (chunks of MLflow's limit of 1000 metrics a call)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for step, metrics in rows
            for key, value in ((self._key(n), v) for n, v in metrics.items())
            if step > self._logged_through.get(key, -1)  # on resume: not already in the run
        ]
        for i in range(0, len(batch), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_METRICS_PER_CALL])

    def log_checkpoint(self, path: str) -> None:
        step = os.path.basename(os.path.normpath(path))
        self.client.log_artifacts(self.run_id, path, artifact_path=f"checkpoints/{step}")

    def finalize(self, status: str) -> None:
        self.client.set_terminated(self.run_id, RUN_STATUS[status])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "run_id": self.run_id} if state else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id", self.run_id)
