"""`Engine`: the configuration and the public face of a run; `FitRun` does the work.

`fit` plans the state (the strategy answers where everything lives), hands it to a `FitRun`
that owns everything live, and exposes what callbacks and users read: counters, metrics,
`state`, `compiled_step`, `module`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from meshfit.callbacks.nan_guard import default_nan_guard
from meshfit.callbacks.progress import ProgressBar
from meshfit.callbacks.summary import default_model_summary
from meshfit.callbacks.tensorboard import TensorBoardLogger
from meshfit.engine.config import EngineConfig
from meshfit.engine.data import make_loader
from meshfit.engine.hooks import Callback, StepTransform
from meshfit.engine.module import MetricMeta, overrides
from meshfit.engine.processes import distributed
from meshfit.engine.run.evaluate import EvalRun
from meshfit.engine.run.fit import FitRun, resolve_checkpoint
from meshfit.engine.run.hooks import HookTable
from meshfit.engine.run.timing import PhaseTimer
from meshfit.engine.state import TrainState
from meshfit.engine.step.plan import ModuleOrFactory, StatePlan, plan_state, relayout
from meshfit.strategies import Strategy, auto, resolve_strategy


class Engine:
    """Fits a `TrainModule` with a compiled step, a placement strategy and callbacks.

    Args:
        strategy: a name ("auto", "single", "dp", ...) or a `Strategy` object.
        devices: how many devices to use (the first N), or a list of devices; default all.
        max_epochs / max_steps: when to stop (optimizer updates for `max_steps`); at least one.
        batch_size: the global batch size (per optimizer update, before accumulation).
        callbacks: extra `Callback`s; a progress bar and a TensorBoard logger are added by default.
        seed: the data order is a function of (seed, epoch) only.
        log_every_n_steps: how often metrics are read from the device and logged.
        val_every_n_steps: validate every N steps; default at the end of each epoch.
        default_root_dir: where logs and checkpoints go (default ./runs).
        enable_progress_bar / logger: turn the default progress bar / TensorBoard logger off.
        precision: "fp32", "bf16" or "fp16" compute dtype; master parameters stay float32.
        gradient_clip_val / gradient_clip_algorithm: clip by global "norm" or by "value".
        max_in_flight: steps dispatched ahead of the host. Default: 2 (bounds device memory, as
            each queued step holds its batch, and avoids the XLA:CPU stall of long multi-device
            queues); on a single CPU device, up to the next metric read (at most 64 steps and
            256 MiB of batches), since there every wait for the device costs compute.
        nan_guard: on a non-finite loss, skip the update and "error" (stop, naming the step) or
            "warn"; False turns the check off. Inactive with DynamicLossScaling (it skips).
        enable_model_summary: print the ModelSummary table at fit start (process 0).
        steps_per_dispatch: optimizer steps fused into one compiled call (`lax.scan`). "auto":
            as many as possible without passing a step the host must see (log, validation,
            checkpoint and profiler cadences, max_steps, the epoch's end); 1 if a callback
            overrides the batch hooks without declaring `fusion_safe`. Bitwise equal to 1.
        data_on_device: keep NumPy training data on the device (transferred once, each
            epoch's permutation applied on the device). "auto": when it fits the budget (a
            quarter of the device memory where `memory_stats()` reports it, 1 GiB on CPU),
            single-process, without gradient accumulation; True insists (or errors).
    """

    def __init__(
        self,
        strategy: str | Strategy = "auto",
        devices: int | Sequence[Any] | None = None,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        batch_size: int = 32,
        callbacks: Sequence[Callback] | None = None,
        seed: int = 0,
        log_every_n_steps: int = 50,
        val_every_n_steps: int | None = None,
        default_root_dir: str = "./runs",
        enable_progress_bar: bool = True,
        logger: bool | Callback = True,
        precision: str = "fp32",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        max_in_flight: int | None = None,
        nan_guard: str | bool = "error",
        enable_model_summary: bool = True,
        steps_per_dispatch: int | str = "auto",
        data_on_device: bool | str = "auto",
    ):
        self.config = EngineConfig(
            strategy=strategy,
            devices=devices,
            max_epochs=max_epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            callbacks=tuple(callbacks or ()),
            seed=seed,
            log_every_n_steps=log_every_n_steps,
            val_every_n_steps=val_every_n_steps,
            default_root_dir=default_root_dir,
            enable_progress_bar=enable_progress_bar,
            logger=logger,
            precision=precision,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            max_in_flight=max_in_flight,
            nan_guard=nan_guard,
            enable_model_summary=enable_model_summary,
            steps_per_dispatch=steps_per_dispatch,
            data_on_device=data_on_device,
        )
        distributed.initialize()  # no-op unless the environment describes a multi-process job
        self.devices = _resolve_devices(devices)
        self.callbacks = _with_defaults(self.config)
        self.strategy: Strategy | None = None
        self.auto_reason: str | None = None  # why strategy="auto" chose what it chose
        self.run: EvalRun | None = None  # the current (or last) run: fit or validate
        self.callback_metrics: dict[str, float] = {}
        self.global_step = 0  # optimizer steps dispatched (host counter; never reads the device)
        self.current_epoch = 0
        self.batch_idx = 0  # next batch of the current epoch (the data position)
        self.num_training_batches: int | None = None
        self.should_stop = False
        self.timings = PhaseTimer()  # host seconds per loop phase (step/data/callbacks/...)

    def __getattr__(self, name: str) -> Any:
        """Configuration fields read as attributes (`engine.max_steps`, `engine.seed`, ...)."""
        if name != "config" and name in EngineConfig.names():
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ public views
    @property
    def is_global_zero(self) -> bool:
        """True on the process that prints, logs and reports."""
        return distributed.is_main_process()

    @property
    def transforms(self) -> list[StepTransform]:
        return [cb for cb in self.callbacks if isinstance(cb, StepTransform)]

    @property
    def micro_batches(self) -> int:
        return math.prod(t.micro_batches for t in self.transforms)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.strategy.mesh

    @property
    def state(self) -> TrainState | None:
        """The train-state pytree; its leaves are the live (sharded) arrays."""
        return None if self.run is None else self.run.state

    @state.setter
    def state(self, value: TrainState) -> None:
        self.run.live.replace(value)

    @property
    def module(self) -> nnx.Module | None:
        return getattr(self.run, "module", None)

    @property
    def layout(self) -> Any:
        """The strategy's answer for this run's state (shardings, parameter specs)."""
        return getattr(self.run, "layout", None)

    @property
    def dispatch_summary(self) -> str | None:
        """How many steps a dispatch fuses in this fit, and which callback forced 1 if any."""
        planner = getattr(self.run, "planner", None)
        return None if planner is None else planner.describe()

    @property
    def data_on_device_active(self) -> bool:
        """Whether this fit keeps its training data on the device."""
        return getattr(self.run, "device_data", None) is not None

    @property
    def compiled_step(self) -> Any:
        return getattr(self.run, "compiled_step", None)

    @property
    def init_compiled(self) -> Any:
        """The compiled sharded init, when fit was given a factory."""
        return getattr(self.run, "init_compiled", None)

    @property
    def metric_meta(self) -> dict[str, MetricMeta]:
        """How each training metric is reduced and whether the progress bar shows it."""
        return getattr(self.run, "train_meta", {})

    @property
    def val_metric_meta(self) -> dict[str, MetricMeta]:
        return {} if self.run is None else self.run.val_meta

    @property
    def val_loader(self) -> Any:
        """The validation data of the current fit (batched), or None."""
        return None if self.run is None else self.run.val_loader

    def train_metric_names(self) -> set[str]:
        """Metrics the training step logs (known once the step is compiled, at fit start)."""
        return self.run.train_metric_names() if isinstance(self.run, FitRun) else set()

    def validation_metric_names(self) -> set[str]:
        """Metrics a validation pass logs (traced, not run); empty without validation data."""
        return set() if self.run is None else self.run.validation_metric_names()

    def checkpoint_state(self, position: tuple[int, int] | None = None) -> tuple[TrainState, dict]:
        """What a checkpoint of this fit holds: the train state and the host meta (data
        position, every callback's `state_dict`, unlogged metrics); `position` overrides the
        data position to resume at (epoch, batch)."""
        return self.run.snapshot(position)

    @property
    def hparams(self) -> dict[str, Any]:
        """The run's configuration, plus the module's own `hparams` dict if it has one."""
        out = {
            "strategy": self.strategy.name if self.strategy else str(self.config.strategy),
            "devices": len(self.devices),
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "max_steps": self.max_steps,
            "seed": self.seed,
            "precision": self.precision,
            "gradient_clip_val": self.gradient_clip_val,
        }
        out.update(getattr(self.module, "hparams", None) or {})
        return out

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Record host-side metrics (Python floats) from a callback: they join
        `callback_metrics` and go to every `on_log` consumer (loggers, progress bar).
        Call it outside your own `on_log` (e.g. from `on_train_batch_end`)."""
        self.run.log({name: float(value) for name, value in metrics.items()})

    # ------------------------------------------------------------------ planning
    def plan(self, module_or_factory: ModuleOrFactory) -> StatePlan:
        """The train state before it exists: structure, optimizer, layout. Settles the
        strategy ("auto" chooses by the state's size); allocates nothing."""
        if self.strategy is None:
            self.strategy = resolve_strategy(self.config.strategy, len(self.devices))
            self.strategy.setup(self.devices)
        config = self.config
        plan = plan_state(
            module_or_factory,
            self.strategy,
            self.transforms,
            config.gradient_clip_val,
            config.gradient_clip_algorithm,
        )
        if config.strategy == "auto":
            chosen, reason = auto.choose(plan.abstract, self.devices)
            if chosen.name != self.strategy.name:
                self.strategy = chosen
                plan = relayout(plan, chosen)
            if reason != self.auto_reason:
                self.auto_reason = reason
                if jax.process_index() == 0:
                    print(f"[meshfit] strategy 'auto' -> {chosen.name!r}: {reason}", flush=True)
        return plan

    # ------------------------------------------------------------------ fit / validate
    def fit(
        self,
        module: ModuleOrFactory,
        train_data: Any,
        val_data: Any = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        """Train `module` (an instance, updated in place; or a factory, built sharded).

        `ckpt_path` resumes from a checkpoint: "last", "best" or a path (see ModelCheckpoint).
        """
        self.should_stop = False
        HookTable(self.callbacks, self, self.timings)("setup")
        found = resolve_checkpoint(self, ckpt_path) if ckpt_path is not None else None
        plan = self.plan(module)
        self.run = FitRun(self, plan, module, train_data, val_data)
        self.run.execute(found)

    def validate(self, module: ModuleOrFactory, data: Any) -> dict[str, float]:
        """Run `validation_step` over `data`; metrics averaged over the whole set (by batch size)."""
        if not overrides(module, "validation_step"):
            raise TypeError(f"{type(module).__name__} has no validation_step to run.")
        run = self.run
        if run is None or module is not self.module or run.live.deleted():
            if self.strategy is None:
                self.strategy = resolve_strategy(self.config.strategy, len(self.devices))
                self.strategy.setup(self.devices)
            run = self.run = EvalRun.for_module(self, module, self.strategy)
            run.module = module
        loader = make_loader(
            data,
            self.batch_size,
            train=False,
            seed=self.seed,
            process_count=distributed.process_count(),
            name="data",
        )
        with jax.set_mesh(self.strategy.mesh):
            return run.validation_pass(loader)


def _resolve_devices(devices: int | Sequence[Any] | None) -> list[Any]:
    available = jax.devices()
    if devices is None:
        return available
    if isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"Engine(devices={devices}) asks for {devices} devices, but {len(available)} "
                f"{available[0].platform} device(s) are available. Use 1..{len(available)}, or "
                "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax."
            )
        return available[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("Engine(devices=[]) got an empty device list.")
    return devices


def _with_defaults(config: EngineConfig) -> list[Callback]:
    """The user's callbacks plus the defaults: progress bar, logger, NaN guard, model summary;
    checkpointing callbacks (`run_last`) last, so they save what the others updated."""
    callbacks = list(config.callbacks)
    if config.enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
        callbacks.append(ProgressBar())
    if isinstance(config.logger, Callback):
        callbacks.append(config.logger)
    elif config.logger and not any(isinstance(cb, TensorBoardLogger) for cb in callbacks):
        callbacks.append(TensorBoardLogger())
    callbacks.sort(key=lambda cb: bool(getattr(cb, "run_last", False)))
    callbacks += default_nan_guard(config.nan_guard, callbacks)
    callbacks += default_model_summary(config.enable_model_summary, callbacks)
    return callbacks
