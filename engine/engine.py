"""`Engine`: the configuration and the public face of a run; `FitRun` does the work.

`fit` plans the state (the strategy answers where everything lives), hands it to a `FitRun`
that owns everything live, and exposes what callbacks and users read: counters, metrics,
`state`, `compiled_step`, `module`.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from meshfit.callbacks.logger import Logger
from meshfit.engine import compile_cache
from meshfit.engine.config import EngineConfig
from meshfit.engine.data import make_loader
from meshfit.engine.datamodule import DataModule, data_for
from meshfit.engine.defaults import default_callbacks, resolve_devices
from meshfit.engine.hooks import Callback, StepTransform
from meshfit.engine.hparams import merge_hparams
from meshfit.engine.module import MetricMeta, overrides
from meshfit.engine.processes import distributed
from meshfit.engine.run.evaluate import EvalRun
from meshfit.engine.run.fit import FitRun
from meshfit.engine.run.hooks import HookTable
from meshfit.engine.run.load import (
    checkpoint_eval_states,
    load_checkpoint_weights,
    resolve_checkpoint,
)
from meshfit.engine.run.predict import PredictRun
from meshfit.engine.run.test import TestRun
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
        enable_progress_bar: turn the default progress bar off.
        logger: True (a TensorBoardLogger, unless loggers are among `callbacks`), False (none),
            a Logger, or a list of Loggers (e.g. [CSVLogger(), WandbLogger()]).
        precision: "fp32", "bf16" or "fp16" compute dtype; master parameters stay float32.
        gradient_clip_val / gradient_clip_algorithm: clip by global "norm" or by "value".
        max_in_flight: steps dispatched ahead of the host. Default: 2 (bounds device memory, as
            each queued step holds its batch, and avoids the XLA:CPU stall of long multi-device
            queues); on a single CPU device, up to the next metric read (at most 64 steps and
            256 MiB of batches), since there every wait for the device costs compute.
        nan_guard: on a non-finite loss, skip the update and "error" (stop, naming the step) or
            "warn"; False turns the check off. Inactive with DynamicLossScaling (it skips).
        enable_model_summary: print the ModelSummary table at fit start (process 0).
        compilation_cache_dir: JAX's persistent compilation cache, so a restart or a second
            run skips XLA compilation: a directory, None (default: <default_root_dir>/jax_cache)
            or False (off). Set at the start of fit / validate / test / predict.
        data_workers: worker processes reading a random-access source (grain `mp_prefetch`);
            0 reads it with threads in this process.
        num_sanity_val_steps: validation batches run before the first training step (when
            there is validation data), so a broken `validation_step` fails in seconds; not
            logged; 0 turns it off.
        steps_per_dispatch: optimizer steps fused into one compiled call (`lax.scan`). "auto":
            as many as possible (up to 128; with the data on the device and observing
            callbacks, up to 4096 as long as a dispatch takes at most about 0.25 s) without
            passing a step the host must see (log,
            validation, checkpoint and profiler cadences, max_steps, the epoch's end); logs
            do not bound it when every log/batch-end hook only observes (each window is then
            closed on the device and logged at its step after the dispatch); 1 if a callback
            overrides the batch hooks without declaring `fusion_safe`. Bitwise equal to 1.
        data_on_device: keep NumPy training data on the device (transferred once, each
            epoch's permutation applied on the device). "auto": when it fits the budget (a
            quarter of the device memory where `memory_stats()` reports it, 1 GiB on CPU),
            single-process, without gradient accumulation; True insists (or errors).
        fast_dev_run: True (1) or N: N training batches and N validation batches (validation
            once, at the end), no sanity check, no checkpoints (ModelCheckpoint is dropped) and
            no loggers, then stop. Replaces max_steps, max_epochs and the limits below.
        limit_train_batches / limit_val_batches: batches per epoch / per validation pass: an
            int, or a float fraction of them; None: all. `limit_val_batches=0` turns
            validation off. The sanity check runs at most limit_val_batches batches.
        overfit_batches: N (or a fraction): train on the first N training batches, unshuffled,
            in every epoch, and validate on those same batches (val_data is not used).
        max_time: stop at the first step boundary after this much training wall time (from
            on_fit_start, as Lightning's):
            "DD:HH:MM:SS", a `timedelta` or a dict (days/hours/minutes/seconds). Adds a
            `Timer`; a ModelCheckpoint (save_last) saves the step it stops at.
        check_val_every_n_epoch: validate at the end of every n-th epoch (when
            val_every_n_steps is unset); None: only every val_every_n_steps.
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
        logger: bool | Logger | Sequence[Logger] = True,
        precision: str = "fp32",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        max_in_flight: int | None = None,
        nan_guard: str | bool = "error",
        enable_model_summary: bool = True,
        data_workers: int = 0,
        compilation_cache_dir: str | os.PathLike | bool | None = None,
        num_sanity_val_steps: int = 2,
        steps_per_dispatch: int | str = "auto",
        data_on_device: bool | str = "auto",
        fast_dev_run: bool | int = False,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        overfit_batches: int | float = 0,
        max_time: str | datetime.timedelta | dict[str, float] | None = None,
        check_val_every_n_epoch: int | None = 1,
    ):
        args = {name: value for name, value in locals().items() if name != "self"}
        self.config = EngineConfig(**args)  # every argument, checked before anything compiles
        distributed.initialize()  # no-op unless the environment describes a multi-process job
        #: Absolute path of the persistent compilation cache, or None when off.
        self.compilation_cache_dir = compile_cache.resolve_cache_dir(
            compilation_cache_dir, self.config.default_root_dir
        )
        compile_cache.configure(self.compilation_cache_dir)  # also caches what is built next
        #: The learning-rate schedule named by configure_optimizers' dict form (else None).
        self.lr_schedule: Any = None
        self.devices = resolve_devices(devices)
        self.callbacks = default_callbacks(self.config)
        self.strategy: Strategy | None = None
        self.auto_reason: str | None = None  # why strategy="auto" chose what it chose
        self.run: EvalRun | None = None  # the current (or last) run: fit or validate
        self.run_config: dict[str, Any] | None = None  # the CLI's resolved config, if any
        self.callback_metrics: dict[str, float] = {}
        self.global_step = 0  # optimizer steps dispatched (host counter; never reads the device)
        self.current_epoch = 0
        self.batch_idx = 0  # next batch of the current epoch (the data position)
        self.num_training_batches: int | None = None
        self.should_stop = False
        #: The global step at the end of the running dispatch: the batch hooks of earlier steps
        #: of a fused dispatch run after it, when `state` is already that step's.
        self.dispatch_end_step: int | None = None
        self.predict_rows: tuple[int, int] | None = None  # rows of the latest prediction outputs
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
    def loggers(self) -> list[Logger]:
        """The experiment loggers among the callbacks (TensorBoard by default)."""
        return [cb for cb in self.callbacks if isinstance(cb, Logger)]

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
    def train_loader(self) -> Any:
        """The training data of the current fit (batched), or None."""
        return getattr(self.run, "train_loader", None)

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
        """The run's configuration, the module's constructor arguments (`module.<name>` where
        a name is taken; see `meshfit.engine.hparams`) and its own `hparams` dict if it has one."""
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
        out = merge_hparams(out, self.module)
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
        train_data: Any = None,
        val_data: Any = None,
        ckpt_path: str | os.PathLike | None = None,
        datamodule: DataModule | None = None,
    ) -> None:
        """Train `module` (an instance, updated in place; or a factory, built sharded).

        `ckpt_path` resumes from a checkpoint: "last", "best" or a path (see ModelCheckpoint).
        `datamodule` (a `DataModule`) supplies the training and validation data instead.
        """
        if datamodule is not None:
            train_data = data_for(datamodule, "fit", train_data, "train_data", "fit()")
            val_data = val_data if val_data is not None else datamodule.val_data()
        elif train_data is None:
            raise TypeError("fit() needs train_data, or datamodule=<a meshfit.DataModule>.")
        compile_cache.configure(self.compilation_cache_dir)
        self.should_stop = False
        HookTable(self.callbacks, self, self.timings)("setup")
        found = resolve_checkpoint(self, ckpt_path) if ckpt_path is not None else None
        plan = self.plan(module)
        self.lr_schedule = plan.lr_schedule
        self.run = FitRun(self, plan, module, train_data, val_data, found)
        self.run.execute()

    def validate(
        self,
        module: ModuleOrFactory,
        data: Any = None,
        ckpt_path: str | os.PathLike | None = None,
        datamodule: DataModule | None = None,
    ) -> dict[str, float]:
        """Run `validation_step` over `data` (or the datamodule's `val_data()`); metrics averaged
        over the whole set (by batch size). `ckpt_path` ("last", "best" or a path) first loads a
        training checkpoint's weights."""
        data = data_for(datamodule, "validate", data, "val_data", "validate()")
        if not overrides(module, "validation_step"):
            raise TypeError(f"{type(module).__name__} has no validation_step to run.")
        run = self.run
        if ckpt_path is not None or run is None or module is not self.module or run.live.deleted():
            run = self._eval_run(EvalRun, module, ckpt_path, "validate")
        with jax.set_mesh(self.strategy.mesh):
            return run.validation_pass(self._eval_loader(data))

    def test(
        self,
        module: nnx.Module,
        data: Any = None,
        ckpt_path: str | os.PathLike | None = None,
        datamodule: DataModule | None = None,
    ) -> dict[str, float]:
        """Run `test_step` over all of `data`: metrics weighted by rows like validation, logged
        to the loggers and kept in `callback_metrics`. `ckpt_path`: "last", "best" or a path
        (a training checkpoint's weights are loaded into `module`); default its own weights."""
        data = data_for(datamodule, "test", data, "test_data", "test()")
        if not overrides(module, "test_step"):
            raise TypeError(
                f"{type(module).__name__} has no test_step, which Engine.test runs over the data. "
                "Define test_step(batch) like validation_step: log metrics with self.log, or "
                "return a scalar (logged as 'test_loss')."
            )
        run = self._eval_run(TestRun, module, ckpt_path, "test")
        with jax.set_mesh(self.strategy.mesh):
            return run.test_pass(self._eval_loader(data))

    def predict(
        self,
        module: nnx.Module,
        data: Any = None,
        ckpt_path: str | os.PathLike | None = None,
        return_predictions: bool = True,
        datamodule: DataModule | None = None,
    ) -> Any:
        """`predict_step` over every row of `data` (NumPy arrays or an iterable of batches): a
        pytree of NumPy arrays, one row per input row in input order, on every process. With
        `return_predictions=False`, returns None (a `PredictionWriter` saves each process's rows)."""
        data = data_for(datamodule, "predict", data, "predict_data", "predict()")
        if not overrides(module, "predict_step") and not callable(module):
            raise TypeError(
                f"{type(module).__name__} has no predict_step and no __call__: the default "
                "predict_step returns self(x). Define __call__(x), or predict_step(batch) "
                "returning per-row outputs."
            )
        run = self._eval_run(PredictRun, module, ckpt_path, "predict")
        with jax.set_mesh(self.strategy.mesh):
            return run.predict(self._eval_loader(data), return_predictions)

    def _eval_run(self, cls: type, module: Any, ckpt_path: Any, what: str) -> Any:
        """A fresh run of `cls` over `module`'s weights (after loading `ckpt_path`, if given)."""
        if not isinstance(module, nnx.Module):
            raise TypeError(f"{what} needs a module instance, got {type(module).__name__}.")
        compile_cache.configure(self.compilation_cache_dir)
        if self.strategy is None:
            self.strategy = resolve_strategy(self.config.strategy, len(self.devices))
            self.strategy.setup(self.devices)
        extra = None  # transform states (e.g. an EMA) that evaluation may use
        if ckpt_path is not None:
            path = load_checkpoint_weights(self, module, ckpt_path, what)
            extra = checkpoint_eval_states(self.transforms, module, path)
        elif self.run is not None and module is self.module and not self.run.live.deleted():
            extra = self.run.state.extra  # the fitted module: evaluate as its run would
        run = self.run = cls.for_module(self, module, self.strategy, extra)
        run.module = module
        return run

    def _eval_loader(self, data: Any) -> Any:
        return make_loader(
            data,
            self.batch_size,
            train=False,
            seed=self.seed,
            process_count=distributed.process_count(),
            name="data",
        )
