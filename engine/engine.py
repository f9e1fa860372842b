"""`Engine`: runs the fit loop; placement is delegated to a `Strategy`, extras to callbacks."""

from __future__ import annotations

import collections
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from meshfit.callbacks.logger import Logger, resolve_loggers
from meshfit.callbacks.nan_guard import default_nan_guard
from meshfit.callbacks.summary import default_model_summary
from meshfit.engine.checkpoint import format as checkpoint
from meshfit.engine.checkpoint import restore
from meshfit.engine.checkpoint.preemption import PreemptionWatcher
from meshfit.engine.data import Placer, make_loader
from meshfit.engine.hardware import print_hardware_report
from meshfit.engine.hooks import Callback, StepTransform, overridden_hooks
from meshfit.engine.hparams import merge_hparams
from meshfit.engine.module import MetricMeta, overrides
from meshfit.engine.processes import distributed
from meshfit.engine.run.loop import fit_loop, validation_pass
from meshfit.engine.run.metrics import MetricWindow
from meshfit.engine.run.timing import PhaseTimer
from meshfit.engine.state import TrainState, tree_bytes
from meshfit.engine.step.build import PRECISIONS, make_eval_step, split_module
from meshfit.engine.step.plan import (
    ModuleOrFactory,
    StatePlan,
    build_state,
    jit_train_step,
    plan_state,
)
from meshfit.strategies import Strategy, available_strategies, resolve_strategy


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
    ):
        if isinstance(strategy, str) and strategy not in available_strategies():
            raise ValueError(
                f"Unknown strategy {strategy!r}. Valid names: {', '.join(available_strategies())}; "
                "or pass a Strategy object, e.g. Engine(strategy=DataParallel())."
            )
        if not isinstance(strategy, str | Strategy):
            raise TypeError(
                f"strategy must be a name or a Strategy, got {type(strategy).__name__}."
            )
        if max_epochs is None and max_steps is None:
            raise ValueError(
                "Engine needs a stopping point: both max_epochs and max_steps are unset. "
                "Pass max_epochs=N (passes over the data) or max_steps=N (optimizer updates)."
            )
        for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        for name, value in (
            ("batch_size", batch_size),
            ("log_every_n_steps", log_every_n_steps),
            ("max_in_flight", 1 if max_in_flight is None else max_in_flight),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if val_every_n_steps is not None and (
            not isinstance(val_every_n_steps, int) or val_every_n_steps < 1
        ):
            raise ValueError(
                f"val_every_n_steps must be a positive integer or None, got {val_every_n_steps!r}."
            )
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision={precision!r} is not supported; use one of {sorted(PRECISIONS)}."
            )
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r}; use 'norm' (global norm) or 'value'."
            )
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0, got {gradient_clip_val!r}.")

        distributed.initialize()  # no-op unless the environment describes a multi-process job
        self.devices = self._resolve_devices(devices)
        self.strategy_arg = strategy
        self.max_epochs, self.max_steps, self.batch_size = max_epochs, max_steps, batch_size
        self.seed, self.log_every_n_steps, self.val_every_n_steps = (
            seed,
            log_every_n_steps,
            val_every_n_steps,
        )
        self.default_root_dir, self.precision = os.fspath(default_root_dir), precision
        self.gradient_clip_val, self.gradient_clip_algorithm = (
            gradient_clip_val,
            gradient_clip_algorithm,
        )
        self.max_in_flight = max_in_flight
        self._batch_bytes = 0  # of one global batch, once fit has seen it
        self.callbacks = self._default_callbacks(list(callbacks or []), enable_progress_bar, logger)
        self.callbacks += default_nan_guard(nan_guard, self.callbacks)
        self.callbacks += default_model_summary(enable_model_summary, self.callbacks)

        self.strategy: Strategy | None = None
        self.module: nnx.Module | None = None
        self.state = None  # the TrainState (a property over the flat leaves the step uses)
        self.compiled_step: Any = None
        self.callback_metrics: dict[str, float] = {}
        self.metric_meta: dict[str, MetricMeta] = {}
        self.global_step = 0  # optimizer steps dispatched (host counter; never reads the device)
        self.current_epoch = 0
        self.batch_idx = 0  # next batch of the current epoch (the data position)
        self.num_training_batches: int | None = None
        self.should_stop = False
        self._graphdef: nnx.GraphDef | None = None
        self._eval_step: Callable | None = None
        self._placer: Placer | None = None
        self._first_batches: tuple | None = None
        self.timings = PhaseTimer()  # host seconds per loop phase (step/data/callbacks/...)

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
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

    @staticmethod
    def _default_callbacks(
        callbacks: list[Callback], progress_bar: bool, logger: bool | Logger | Sequence[Logger]
    ) -> list[Callback]:
        from meshfit.callbacks import ProgressBar, TensorBoardLogger

        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}.")
        if progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
        loggers = resolve_loggers(logger)
        if loggers is None:  # logger=True: TensorBoard, unless loggers are among the callbacks
            if not any(isinstance(cb, Logger) for cb in callbacks):
                callbacks.append(TensorBoardLogger())
        else:
            callbacks += [lg for lg in loggers if not any(lg is cb for cb in callbacks)]
        callbacks.sort(key=lambda cb: bool(getattr(cb, "run_last", False)))  # e.g. checkpoints
        return callbacks

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
    def hparams(self) -> dict[str, Any]:
        """The run's configuration, the module's constructor arguments (`module.<name>` where
        a name is taken; see `meshfit.engine.hparams`) and its own `hparams` dict if it has one."""
        out = {
            "strategy": self.strategy.name if self.strategy else str(self.strategy_arg),
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

    def _call(self, hook: str, *args: Any) -> None:
        fns = self._hooks[hook]
        if not fns:
            return
        if not self.timings.enabled:  # the common case: no timing context on the hot path
            for fn in fns:
                fn(self, *args)
            return
        with self.timings.phase("callbacks"):
            for fn in fns:
                fn(self, *args)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Record host-side metrics (Python floats) from a callback: they join
        `callback_metrics` and go to every `on_log` consumer (loggers, progress bar).
        Call it outside your own `on_log` (e.g. from `on_train_batch_end`)."""
        metrics = {name: float(value) for name, value in metrics.items()}
        if metrics:
            self.callback_metrics.update(metrics)
            self._call("on_log", metrics)

    def _index_hooks(self) -> None:
        self._hooks: dict[str, list[Callable]] = collections.defaultdict(list)
        for cb in self.callbacks:
            for hook in overridden_hooks(cb):
                self._hooks[hook].append(getattr(cb, hook))

    def _setup_strategy(self) -> Strategy:
        if self.strategy is None:
            self.strategy = resolve_strategy(self.strategy_arg, len(self.devices))
            self.strategy.setup(self.devices)
        return self.strategy

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> TrainState | None:
        """The train-state pytree; its leaves are the live (sharded) arrays."""
        if self._state is None and self._leaves is not None:
            self._state = self._treedef.unflatten(self._leaves)
        return self._state

    @state.setter
    def state(self, value: TrainState | None) -> None:
        self._state, self._leaves = value, None
        self._treedef = None if value is None else jax.tree.structure(value)

    def _state_leaves(self) -> list[jax.Array]:
        """The state's flat leaves, what the jitted train step takes and returns."""
        if self._leaves is None:
            self._leaves = self._treedef.flatten_up_to(self._state)
        return self._leaves

    def _plan_state(self, module_or_factory: ModuleOrFactory) -> StatePlan:
        """The train state before it exists (see `meshfit.plan.plan_state`)."""
        return plan_state(self, module_or_factory)

    # ------------------------------------------------------------------ fit
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
        self._index_hooks()
        self.should_stop = False
        self._call("setup")
        resume_from = checkpoint.resolve(self, ckpt_path) if ckpt_path is not None else None
        plan = self._plan_state(module)
        strategy = self.strategy
        self.state, self.init_compiled = build_state(plan, module, strategy.mesh)
        self._graphdef = plan.graphdef
        strategy.check_batch_size(self.batch_size)
        # one step = `micro_batches` batches (gradient accumulation windows)
        train_loader = self._loader(train_data, "train_data", micro_batches=self.micro_batches)
        val_loader = None if val_data is None else self._loader(val_data, "val_data")
        self.num_training_batches = _length(train_loader)
        self._placer = Placer(strategy.batch_sharding, strategy.replicated())

        batch_example = self._example_batch(train_loader)
        self._batch_bytes = tree_bytes(batch_example)  # bounds the batches queued in flight
        self._train_step = jit_train_step(
            plan, strategy, self.transforms, self.metric_meta, self.precision, batch_example
        )
        self._build_eval_step()
        self.module = (
            module
            if isinstance(module, nnx.Module)
            else nnx.merge(self._graphdef, self.state.params, self.state.rest)
        )
        self._val_loader, self._train_window = val_loader, MetricWindow(self.metric_meta)
        restore.restore(self, resume_from)  # resharded onto this run's layout; no-op if None
        # Tracing, compiling and the loop all run under the mesh (it is part of the trace key).
        with jax.set_mesh(strategy.mesh):
            self.compiled_step = self._train_step.lower(
                self._state_leaves(), batch_example
            ).compile()
            print_hardware_report(self)
            self._call("on_fit_start")
            self._preemption = PreemptionWatcher().install()
            try:
                fit_loop(self, train_loader, val_loader)
                self._call("on_fit_end")
            except BaseException as exc:
                self._call("on_exception", exc)
                raise
            finally:
                self._preemption.uninstall()
                self._write_back()
                self._call("teardown")

    def _loader(self, data: Any, name: str, micro_batches: int | None = None) -> Any:
        """Training loaders (micro_batches given) shuffle and drop the last partial batch."""
        return make_loader(
            data,
            self.batch_size,
            train=micro_batches is not None,
            seed=self.seed,
            process_count=distributed.process_count(),
            name=name,
            micro_batches=micro_batches or 1,
        )

    def _example_batch(self, loader: Any) -> Any:
        """Abstract first batch (shapes, dtypes, shardings) to compile the step before the loop."""
        batches = loader.epoch(self.current_epoch, self.batch_idx, self._placer.rows_for)
        first = next(batches, None)
        if first is None:
            raise ValueError(
                "train_data produced no batches; check that it is not an exhausted iterator."
            )
        # The loop starts with this same generator, so a one-shot iterator loses nothing.
        self._first_batches = (
            self.current_epoch,
            self.batch_idx,
            itertools.chain([first], batches),
        )
        if not first.sharded or first.global_size % self.strategy.data_parallel_size:
            self.strategy.check_batch_size(first.global_size, "Training batch size")

        def abstract(x):
            shape = (first.global_size, *x.shape[1:]) if x.ndim else ()
            return jax.ShapeDtypeStruct(
                shape, x.dtype, sharding=self.strategy.batch_sharding(x.ndim)
            )

        return jax.tree.map(abstract, first.local)

    def _write_back(self) -> None:
        """Put the trained variables back into the user's module (NNX: in place)."""
        if self.module is not None and self.state is not None and not _deleted(self.state):
            nnx.update(self.module, self.state.params, self.state.rest)

    # ------------------------------------------------------------------ validation
    def _build_eval_step(self) -> None:
        self._val_meta: dict[str, MetricMeta] = {}
        eval_step = make_eval_step(
            self._graphdef,
            self._val_meta,
            compute_dtype=PRECISIONS[self.precision],
            context=self.strategy.step_context,
        )
        self._eval_step = jax.jit(eval_step)

    def validate(self, module: ModuleOrFactory, data: Any) -> dict[str, float]:
        """Run `validation_step` over `data`; metrics averaged over the whole set (by batch size)."""
        if not overrides(module, "validation_step"):
            raise TypeError(f"{type(module).__name__} has no validation_step to run.")
        self._index_hooks()
        if module is not self.module or self.state is None or _deleted(self.state):
            strategy = self._setup_strategy()
            graphdef, params, rest = split_module(module)
            state = TrainState(jnp.zeros((), jnp.int32), params, rest, (), {})
            shardings = strategy.state_shardings(jax.eval_shape(lambda s: s, state))
            self.state = jax.device_put(state, shardings, may_alias=False)
            self._graphdef, self.module = graphdef, module
            self._placer = Placer(strategy.batch_sharding, strategy.replicated())
            self._build_eval_step()
        loader = self._loader(data, "data")
        with jax.set_mesh(self.strategy.mesh):
            return validation_pass(self, loader)


def _length(loader: Any) -> int | None:
    """Batches per epoch, or None for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def _deleted(tree: Any) -> bool:
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))
