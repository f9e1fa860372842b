"""`WandbLogger`: metrics, hyperparameters and (optionally) checkpoints to Weights & Biases."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from meshfit.callbacks.logger import Logger, require

if TYPE_CHECKING:
    from meshfit.engine.engine import Engine

EXIT_CODES = {"success": 0, "failed": 1, "interrupted": 1}


class WandbLogger(Logger):
    """Logs to a W&B run: metrics at the optimizer step, the hyperparameters as the run config.

    Args:
        project / name: the W&B project and run name.
        offline: write the run locally (`wandb sync` uploads it later); no network needed.
        log_checkpoints: log each committed ModelCheckpoint directory as a `model` artifact.
        **init_kwargs: passed to `wandb.init` (e.g. `entity`, `tags`, `group`, `dir`).

    The run's directory (`log_dir`) is under `dir` (default: `$WANDB_DIR`, else
    `<default_root_dir>`). The run id is saved in checkpoints: `fit(..., ckpt_path=...)`
    continues the same run (`resume="allow"`). W&B keeps a run's steps increasing: online it
    drops steps it already holds; offline, `wandb sync` the run's directories in order.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        offline: bool = False,
        log_checkpoints: bool = False,
        **init_kwargs: Any,
    ):
        require("wandb", "WandbLogger", "wandb")
        super().__init__()
        self.project, self.name, self.offline = project, name, offline
        self.log_checkpoints = log_checkpoints
        self.init_kwargs = init_kwargs
        self._given_id = init_kwargs.pop("id", None)
        self.run: Any = None
        self.run_id: str | None = None

    def open(self, engine: Engine, resume_step: int | None) -> None:
        import wandb

        kwargs = dict(self.init_kwargs)
        self.save_dir = os.path.abspath(
            kwargs.pop("dir", None) or os.environ.get("WANDB_DIR") or engine.default_root_dir
        )
        os.makedirs(self.save_dir, exist_ok=True)
        if self.offline:
            kwargs["mode"] = "offline"
        if resume_step is not None and self.run_id is not None:
            kwargs.setdefault("resume", "allow")  # the run the checkpoint names
        else:
            self.run_id = self._given_id  # a new run (W&B picks an id unless one was given)
        self.run = wandb.init(
            project=self.project, name=self.name, dir=self.save_dir, id=self.run_id, **kwargs
        )
        self.run_id, self.log_dir = self.run.id, os.path.dirname(self.run.dir)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_checkpoint(self, path: str) -> None:
        import wandb

        step = os.path.basename(os.path.normpath(path))
        artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"step": step})
        artifact.add_dir(path)
        self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])

    def finalize(self, status: str) -> None:
        if status == "interrupted":
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_CODES[status])
        self.run = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "run_id": self.run_id} if state else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id", self.run_id)
