"""`Engine`: runs the fit loop; placement is delegated to a `Strategy`, extras to callbacks."""

from __future__ import annotations

import collections
import contextlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from meshfit import distributed
from meshfit.callbacks.base import Callback, StepTransform, overridden_hooks
from meshfit.data import ArrayLoader, Placer, make_loader
from meshfit.metrics import MetricWindow
from meshfit.module import MetricMeta, overrides
from meshfit.state import TrainState
from meshfit.step import PRECISIONS, make_eval_step, make_train_step, split_module
from meshfit.strategies import Strategy, available_strategies, resolve_strategy

ModuleOrFactory = nnx.Module | Callable[[], nnx.Module]


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
        max_in_flight: steps dispatched ahead of the host (bounds memory and the CPU queue).
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
        max_in_flight: int = 2,
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
            ("max_in_flight", max_in_flight),
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
        self.callbacks = self._default_callbacks(list(callbacks or []), enable_progress_bar, logger)

        self.strategy: Strategy | None = None
        self.module: nnx.Module | None = None
        self.state: TrainState | None = None
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
        callbacks: list[Callback], progress_bar: bool, logger: bool | Callback
    ) -> list[Callback]:
        from meshfit.callbacks import ProgressBar, TensorBoardLogger

        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}.")
        if progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
        if isinstance(logger, Callback):
            callbacks.append(logger)
        elif logger and not any(isinstance(cb, TensorBoardLogger) for cb in callbacks):
            callbacks.append(TensorBoardLogger())
        return callbacks

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
    def hparams(self) -> dict[str, Any]:
        """The run's configuration, plus the module's own `hparams` dict if it has one."""
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
        out.update(getattr(self.module, "hparams", None) or {})
        return out

    def _call(self, hook: str, *args: Any) -> None:
        for fn in self._hooks[hook]:
            fn(self, *args)

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
    def _optimizer(self, module: nnx.Module) -> optax.GradientTransformation:
        try:
            tx = module.configure_optimizers()
        except NotImplementedError:
            tx = None
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"{type(module).__name__}.configure_optimizers() must return an optax "
                f"GradientTransformation (e.g. `return optax.adam(1e-3)`), got {type(tx).__name__}."
            )
        if self.gradient_clip_val is not None:
            clip = (
                optax.clip_by_global_norm(self.gradient_clip_val)
                if self.gradient_clip_algorithm == "norm"
                else optax.clip(self.gradient_clip_val)
            )
            tx = optax.chain(clip, tx)
        return tx

    def _build_state(
        self, module_or_factory: ModuleOrFactory
    ) -> tuple[nnx.Module | None, optax.GradientTransformation]:
        """Create `self.state` laid out by the strategy. A factory is built directly sharded."""
        strategy = self._setup_strategy()
        is_factory = not isinstance(module_or_factory, nnx.Module)
        if is_factory and not callable(module_or_factory):
            raise TypeError(
                "fit() expects a TrainModule instance or a zero-argument factory returning one, "
                f"got {type(module_or_factory).__name__}."
            )
        with jax.set_mesh(strategy.mesh):
            template = nnx.eval_shape(module_or_factory) if is_factory else module_or_factory
            if not callable(getattr(template, "training_step", None)) or (
                not overrides(template, "training_step") and hasattr(type(template), "log")
            ):
                raise TypeError(
                    f"{type(template).__name__} has no training_step. Subclass meshfit.TrainModule "
                    "and define `def training_step(self, batch): ... return loss`."
                )
            tx = self._optimizer(template)
            transforms = self.transforms
            graphdef, params, rest = split_module(template)

            def init(params, rest):
                extra = {t.state_key: t.init(params) for t in transforms}
                return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), extra)

            abstract = jax.eval_shape(init, params, rest)
            shardings = strategy.state_shardings(abstract)
            if is_factory:

                def build():
                    _, p, r = split_module(module_or_factory())
                    return init(p, r)

                self.init_compiled = jax.jit(build, out_shardings=shardings).lower().compile()
                self.state = self.init_compiled()
            else:
                params, rest = jax.device_put(
                    (params, rest), (shardings.params, shardings.rest), may_alias=False
                )
                self.state = jax.jit(init, out_shardings=shardings)(params, rest)
        self._graphdef, self._state_shardings = graphdef, shardings
        return (None if is_factory else module_or_factory), tx

    # ------------------------------------------------------------------ fit
    def fit(self, module: ModuleOrFactory, train_data: Any, val_data: Any = None) -> None:
        """Train `module` (an instance, updated in place; or a factory, built sharded)."""
        self._index_hooks()
        self.should_stop = False
        self._call("setup")
        instance, tx = self._build_state(module)
        strategy = self.strategy
        self.micro_batches  # noqa: B018  (validates transforms early)
        rows_per_step = self.batch_size * self.micro_batches
        strategy.check_batch_size(self.batch_size)
        train_loader = make_loader(
            train_data,
            rows_per_step,
            train=True,
            seed=self.seed,
            process_count=distributed.process_count(),
            name="train_data",
        )
        val_loader = None
        if val_data is not None:
            val_loader = make_loader(
                val_data,
                self.batch_size,
                train=False,
                seed=self.seed,
                process_count=distributed.process_count(),
                name="val_data",
            )
        self.num_training_batches = (
            len(train_loader)
            if hasattr(train_loader, "__len__") and _has_len(train_loader)
            else None
        )
        self._placer = Placer(strategy.batch_sharding, strategy.replicated())

        train_step = make_train_step(
            self._graphdef,
            tx,
            self.transforms,
            self.metric_meta,
            compute_dtype=PRECISIONS[self.precision],
            context=strategy.step_context,
        )
        batch_example = self._example_batch(train_loader)
        batch_shardings = jax.tree.map(lambda x: strategy.batch_sharding(x.ndim), batch_example)
        self._train_step = jax.jit(
            train_step,
            in_shardings=(self._state_shardings, batch_shardings),
            out_shardings=(self._state_shardings, strategy.replicated()),
            donate_argnums=0,
        )
        self._build_eval_step()
        self.module = (
            instance
            if instance is not None
            else nnx.merge(self._graphdef, self.state.params, self.state.rest)
        )
        # Tracing, compiling and the loop all run under the mesh (it is part of the trace key).
        with jax.set_mesh(strategy.mesh):
            self.compiled_step = self._train_step.lower(self.state, batch_example).compile()
            self._call("on_fit_start")
            try:
                self._fit_loop(train_loader, val_loader)
                self._call("on_fit_end")
            except BaseException as exc:
                self._call("on_exception", exc)
                raise
            finally:
                self._write_back()
                self._call("teardown")

    def _example_batch(self, loader: Any) -> Any:
        """Abstract first batch (shapes, dtypes, shardings) to compile the step before the loop."""
        first = next(iter(loader.epoch(0, rows_for=self._placer.rows_for)))
        if not first.sharded or first.global_size % self.strategy.data_parallel_size:
            self.strategy.check_batch_size(first.global_size, "Training batch size")

        def abstract(x):
            shape = (first.global_size, *x.shape[1:]) if x.ndim else ()
            return jax.ShapeDtypeStruct(
                shape, x.dtype, sharding=self.strategy.batch_sharding(x.ndim)
            )

        return jax.tree.map(abstract, first.local)

    def _fit_loop(self, train_loader: Any, val_loader: Any) -> None:
        window = MetricWindow(self.metric_meta)
        in_flight: collections.deque = collections.deque()
        batch_hooks = bool(self._hooks["on_train_batch_start"] or self._hooks["on_train_batch_end"])
        step = self._train_step
        while not self._finished():
            self._call("on_train_epoch_start")
            batches = train_loader.epoch(self.current_epoch, self.batch_idx, self._placer.rows_for)
            exhausted = True
            for batch, _rows in self._placer.prefetch(batches):
                if batch_hooks:
                    self._call("on_train_batch_start", batch, self.batch_idx)
                self.state, outputs = step(self.state, batch)
                window.add(outputs)
                in_flight.append(outputs)
                if len(in_flight) > self.max_in_flight:
                    jax.block_until_ready(in_flight.popleft())
                self.global_step += 1
                self.batch_idx += 1
                if self.global_step % self.log_every_n_steps == 0:
                    self._log(window)
                if batch_hooks:
                    self._call("on_train_batch_end", outputs, batch, self.batch_idx - 1)
                if (
                    val_loader is not None
                    and self.val_every_n_steps
                    and self.global_step % self.val_every_n_steps == 0
                ):
                    self._validation_pass(val_loader)
                if self.should_stop or self._reached_max_steps():
                    exhausted = (
                        self.num_training_batches is not None
                        and self.batch_idx >= self.num_training_batches
                    )
                    break
            if self.global_step == 0 and self.batch_idx == 0:
                raise ValueError(
                    "train_data produced no batches; check that it is not an exhausted iterator."
                )
            self._log(window)
            if exhausted:
                if val_loader is not None and self.val_every_n_steps is None:
                    self._validation_pass(val_loader)
                self._call("on_train_epoch_end")
                self.current_epoch += 1
                self.batch_idx = 0
            elif val_loader is not None and self.val_every_n_steps is None:
                self._validation_pass(val_loader)  # stopped mid-epoch: still report validation
        jax.block_until_ready(self.state)

    def _finished(self) -> bool:
        if self.should_stop or self._reached_max_steps():
            return True
        return self.max_epochs is not None and self.current_epoch >= self.max_epochs

    def _reached_max_steps(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _log(self, window: MetricWindow) -> None:
        if len(window):
            metrics = window.compute()
            self.callback_metrics.update(metrics)
            self._call("on_log", metrics)

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

    def _validation_pass(self, loader: Any) -> dict[str, float]:
        self._call("on_validation_start")
        window = MetricWindow(self._val_meta)
        in_flight: collections.deque = collections.deque()
        for batch, rows in self._placer.prefetch(loader.epoch(0, 0, self._placer.rows_for)):
            outputs = self._eval_step(self.state.params, self.state.rest, batch)
            window.add(outputs, weight=rows)
            in_flight.append(outputs)
            if len(in_flight) > self.max_in_flight:
                jax.block_until_ready(in_flight.popleft())
        metrics = window.compute() if len(window) else {}
        self.callback_metrics.update(metrics)
        if metrics:
            self._call("on_log", metrics)
        self._call("on_validation_end")
        return metrics

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
        loader = make_loader(
            data,
            self.batch_size,
            train=False,
            seed=self.seed,
            process_count=distributed.process_count(),
            name="data",
        )
        with jax.set_mesh(self.strategy.mesh):
            return self._validation_pass(loader)


def _has_len(loader: Any) -> bool:
    if isinstance(loader, ArrayLoader):
        return True
    try:
        len(loader)
    except TypeError:
        return False
    return True


def _deleted(tree: Any) -> bool:
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


_ = (contextlib, warnings)
