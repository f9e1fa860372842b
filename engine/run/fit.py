"""`FitRun`: one `Engine.fit`, from the plan to the written-back module, and its loop.

It owns everything live: the train state (`LiveState`), the compiled step, the loaders, the
placer, the metric window, the preemption watcher and the hook table. The `Engine` holds the
configuration and the public counters (`global_step`, `current_epoch`, `batch_idx`,
`should_stop`, `callback_metrics`) that callbacks read.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
from flax import nnx

from meshfit.engine.checkpoint import find
from meshfit.engine.checkpoint.preemption import PreemptionWatcher
from meshfit.engine.data import make_loader
from meshfit.engine.data.checks import check_same_structure, example_rows
from meshfit.engine.hardware import hardware_report
from meshfit.engine.hooks import overridden_hooks
from meshfit.engine.module import MetricMeta
from meshfit.engine.processes import distributed
from meshfit.engine.run import control, resumable
from meshfit.engine.run.device_metrics import DeviceMetrics
from meshfit.engine.run.dispatch import (
    DispatchPlanner,
    epoch_boundaries_observed,
    fusion_blockers,
    observers_only,
    replay_ends,
    replay_starts,
    spans_logs,
)
from meshfit.engine.run.evaluate import EvalRun
from meshfit.engine.run.feed import TrainFeed
from meshfit.engine.run.inflight import InFlight, in_flight_limit
from meshfit.engine.run.sanity import sanity_check
from meshfit.engine.state import LiveState
from meshfit.engine.step.build import leaves_train_step
from meshfit.engine.step.fused import COUNT, FusedStep
from meshfit.engine.step.plan import ModuleOrFactory, StatePlan, build_state
from meshfit.engine.trees import tree_bytes


class FitRun(EvalRun):
    """Built by `Engine.fit` once the plan exists; `execute` runs the loop to the end."""

    def __init__(
        self,
        engine: Any,
        plan: StatePlan,
        module: ModuleOrFactory,
        train_data: Any,
        val_data: Any,
        found: find.Resume | None = None,
    ):
        """`found`: the checkpoint to resume from (see `resolve_checkpoint`)."""
        strategy, config = engine.strategy, engine.config
        state, self.init_compiled = build_state(plan, module, strategy.mesh)
        super().__init__(engine, strategy, plan.graphdef, LiveState(state), plan.layout)
        strategy.check_batch_size(config.batch_size)
        self.micro_batches = engine.micro_batches  # one step = this many batches (accumulation)
        # limit_*_batches / overfit_batches / fast_dev_run: shorter epochs, fewer val batches
        self.train_loader, self.val_loader, engine.num_training_batches = control.fit_loaders(
            config, self._loader, train_data, val_data, self.micro_batches
        )
        control.announce(config, engine.num_training_batches, self.val_loader, val_data)
        # restored before the first batch is read, so reading starts where the run stopped
        meta = self.restore(found) if found is not None else {}
        self.batch_example = self._example_batch()
        if self.val_loader is not None:
            check_same_structure(example_rows(self.batch_example), self.val_loader.row_spec())
        self.in_flight_limit = in_flight_limit(
            config.max_in_flight, strategy.mesh, config.log_every_n_steps, self.batch_bytes
        )
        self.train_meta: dict[str, MetricMeta] = {}  # filled while the step is traced
        step = leaves_train_step(
            plan, strategy, engine.transforms, self.train_meta, config.precision
        )
        # A callback that is not fusion-safe reads each step's real batch (one step a dispatch).
        self.real_batches = bool(fusion_blockers(engine.callbacks))
        self.feed = TrainFeed(engine, self.train_loader, self.placer, self.real_batches)
        self.device_data = self.feed.device_data
        if self.device_data is not None:  # the step gathers its rows on the device
            self.batch_example = self.device_data.step_shapes()
        every = config.val_every_n_steps if self.val_loader is not None else None
        multi = distributed.process_count() > 1
        self.preemption = PreemptionWatcher()
        # A dispatch's host work may wait for the next dispatch; with "auto", a dispatch may
        # then also span log windows (the program closes them; the host logs each at its step).
        self.defer_logs = observers_only(engine.callbacks)
        # ... and an epoch's end may then wait for the next epoch's first dispatch too
        self.defer_epochs = self.defer_logs and epoch_boundaries_observed(engine.callbacks)
        self.spans_logs = spans_logs(config.steps_per_dispatch, engine.callbacks)
        self.planner = DispatchPlanner(
            config.steps_per_dispatch,
            engine,
            engine.callbacks,
            any_size=self.device_data is not None,  # one program runs every K (FusedStep)
            spans_logs=self.spans_logs,
            val_every=every,
            preemption_every=self.preemption.sync_every if multi else None,
        )
        self.fused = FusedStep(
            step,
            self.train_meta,
            strategy,
            jax.tree.structure(plan.abstract).flatten_up_to(plan.shardings),
            rows=None if self.device_data is None else self.device_data.rows,
            k_max=self.planner.k_max,  # with data on the device, one program for every K
            log_every=config.log_every_n_steps,
        )
        xs = self.feed.abstract_xs(self.batch_example)
        names = self.fused.metric_shapes(self.live.leaves, xs)
        self.window = DeviceMetrics(self.train_meta, names, strategy.replicated())
        self.window.load_state_dict(meta.get("metric_window") or {})  # the unlogged steps
        self.module = (
            module
            if isinstance(module, nnx.Module)
            else nnx.merge(plan.graphdef, state.params, state.rest)
        )
        self.compiled_step: Any = None
        self.epoch_end_reads = any(  # a callback reads the metrics at each epoch's end
            "on_train_epoch_end" in overridden_hooks(cb)
            and getattr(cb, "epoch_end_reads_metrics", True)
            for cb in engine.callbacks
        )

    def _loader(self, data: Any, name: str, train: bool = False) -> Any:
        """Training loaders shuffle and drop the last partial batch."""
        return make_loader(
            data,
            self.config.batch_size,
            train=train,
            seed=self.config.seed,
            process_count=distributed.process_count(),
            name=name,
            micro_batches=self.micro_batches if train else 1,
            workers=self.config.data_workers,
        )

    def _example_batch(self) -> Any:
        """Abstract first batch (shapes, dtypes, shardings) to compile the step before the loop.
        The loop starts with this same generator, so a one-shot iterator loses nothing."""
        engine, rows_for = self.engine, self.placer.rows_for
        epoch, start = engine.current_epoch, engine.batch_idx
        n = engine.num_training_batches
        at_end = n is not None and start >= n  # resumed right after an epoch's last batch
        if not at_end:
            batches = self.train_loader.epoch(epoch, start, rows_for)
            first = next(batches, None)
            at_end = first is None and start > 0  # an iterable's epoch ended right there
        if at_end:
            epoch, start = epoch + 1, 0
            batches = self.train_loader.epoch(epoch, start, rows_for)
            first = next(batches, None)
        self.resumed_at_epoch_end = at_end  # the loop ends that epoch before reading more
        if first is None:
            raise ValueError(
                "train_data produced no batches; check that it is not an exhausted iterator."
            )
        self.first_batches = (epoch, start, itertools.chain([first], batches))
        if not first.sharded or first.global_size % self.strategy.data_parallel_size:
            self.strategy.check_batch_size(first.global_size, "Training batch size")

        def abstract(x):
            shape = (first.global_size, *x.shape[1:]) if x.ndim else ()
            return jax.ShapeDtypeStruct(
                shape, x.dtype, sharding=self.strategy.batch_sharding(x.ndim)
            )

        example = jax.tree.map(abstract, first.local)
        self.batch_bytes = tree_bytes(example)  # bounds the batches queued in flight
        return example

    # ------------------------------------------------------------------ checkpoints
    snapshot = resumable.snapshot
    restore = resumable.restore
    checkpoint_and_exit = resumable.checkpoint_and_exit

    # ------------------------------------------------------------------ the run
    def execute(self) -> None:
        """Compile, then loop until done; the module always gets the latest good state back,
        and `teardown` always runs."""
        engine = self.engine
        # Tracing, compiling and the loop all run under the mesh (it is part of the trace key).
        with jax.set_mesh(self.strategy.mesh):
            self.compiled_step = self.fused.compile(
                1, self.live.leaves, self.window.acc, self.feed.abstract_xs(self.batch_example)
            )
            if engine.is_global_zero:
                print(hardware_report(engine.devices), flush=True)
            self.preemption.install()
            try:  # from on_fit_start on, a failure still reaches on_exception and teardown
                self.hooks("on_fit_start")
                sanity_check(self, self.config.num_sanity_val_steps)
                self.fit_loop()
                self.hooks("on_fit_end")
            except BaseException as exc:
                self.hooks("on_exception", exc)
                raise
            finally:
                self.preemption.uninstall()
                self.write_back()
                self.hooks("teardown")

    def write_back(self) -> None:
        """Put the trained variables back into the user's module (NNX: in place)."""
        if not self.live.deleted():
            nnx.update(self.module, self.state.params, self.state.rest)

    def fit_loop(self) -> None:
        """Epochs of steps until max_epochs / max_steps / should_stop, from the data position:
        each dispatch fuses as many steps as `DispatchPlanner` allows, metrics accumulate on
        the device and are read at the log cadence, hooks run in documented order."""
        engine, hooks, live, window = self.engine, self.hooks, self.live, self.window
        in_flight = InFlight(self.in_flight_limit, timed=self.planner.timed)
        start_hooks = hooks.has("on_train_batch_start")
        log_every, val_every = self.config.log_every_n_steps, self.config.val_every_n_steps
        validate_mid_epoch = self.val_loader is not None and val_every
        timings, n = engine.timings, engine.num_training_batches
        timings.start()  # phases: waiting for data until the step is dispatched
        pending = None  # a dispatch's host work, run once the next dispatch is queued
        while not self.finished():
            if pending is None:  # else the last epoch's deferred end starts this one
                hooks("on_train_epoch_start")
            if self.resumed_at_epoch_end:  # no batch is left in it: straight to its end
                take = lambda k: (None, 0, None)  # noqa: E731
            else:
                take = self.feed.epoch(engine, self.first_batches)
                self.first_batches = None
            exhausted, epoch_start = True, engine.batch_idx
            defer_end = self.epoch_end_deferrable()
            while True:
                left = None if n is None else n - engine.batch_idx
                k = self.planner.next_k(engine, left, in_flight.step_seconds)
                xs, k, shapes = take(k) if k else (None, 0, None)
                if not k:
                    break
                g0, b0 = engine.global_step, engine.batch_idx
                engine.dispatch_end_step = g0 + k  # the step whose state the hooks can see
                if self.real_batches and k == 1 and self.device_data is None:
                    with timings.phase("step"):  # device work (a slice), not waiting for data
                        shapes = jax.tree.map(lambda x: x[0], xs)  # the batch, not its shapes
                if start_hooks:
                    replay_starts(hooks, engine, g0, b0, k, shapes)
                timings.begin_step(k)
                until = log_every - g0 % log_every  # steps to the next log
                leaves, acc, per_step, windows = self.fused(
                    k, live.leaves, window.acc, xs, window.fresh, until
                )
                live.advance(leaves)
                closes = list(range(until - 1, k, log_every))  # the windows it closed
                window.update(acc, k, closes[-1] + 1 if closes else None)
                in_flight.add(per_step, k)
                timings.switch("data")
                if pending is not None:  # the last dispatch's, while this one runs
                    pending = pending()
                post = self.after_dispatch(g0, b0, k, shapes, per_step, windows, closes)
                g = engine.global_step = g0 + k
                engine.batch_idx = b0 + k
                hooks("on_train_dispatch_end", k)
                validate = validate_mid_epoch and g % val_every == 0
                preempted = self.preemption.requested(g)
                stop = engine.should_stop or self.reached_max_steps()
                ends_epoch = n is not None and b0 + k >= n and not defer_end
                if self.defer_logs and not (validate or preempted or stop or ends_epoch):
                    pending = post  # its logs and hooks, once the next dispatch is queued
                    continue
                post()
                if validate:
                    self.validation_pass(self.val_loader)
                if preempted:
                    self.checkpoint_and_exit()  # saves, then raises Preempted (exit 75)
                if engine.should_stop or self.reached_max_steps():
                    exhausted = n is not None and engine.batch_idx >= n
                    break
            if defer_end and exhausted and pending is not None:
                pending = self.defer_epoch_end(pending, epoch_start)
            else:
                if pending is not None:
                    pending = pending()
                self.end_epoch(exhausted, epoch_start, self.resumed_at_epoch_end)
            self.resumed_at_epoch_end = False
        if pending is not None:
            pending()
        self.log_window()  # the steps since the last log
        with timings.phase("step"):
            jax.block_until_ready(live.leaves)
        timings.stop()

    def epoch_end_deferrable(self) -> bool:
        """Whether this epoch's end may wait until the next epoch's first dispatch is queued
        (so the device does not idle at the boundary): every hook of the batch ends, logs and
        epoch boundaries only observes, none replays batch starts, no validation runs there."""
        return (
            self.defer_epochs
            and not self.resumed_at_epoch_end
            and not control.validates_at_epoch_end(
                self.config, self.val_loader, self.engine.current_epoch
            )
        )

    def defer_epoch_end(self, post: Any, epoch_start: int) -> Any:
        """End the epoch now on the counters (and start the epoch-end metric read); return its
        host work: the last dispatch's `post`, the epoch-end log and hooks at the epoch's
        counters, then the next epoch's start hooks (if another epoch follows)."""
        engine = self.engine
        self.check_epoch_read(epoch_start)
        read = self.window.detach() if self.epoch_end_reads and len(self.window) else None
        at = engine.current_epoch, engine.batch_idx, engine.global_step
        engine.current_epoch += 1
        engine.batch_idx = 0
        another = not self.finished()

        def run() -> None:
            now = engine.current_epoch, engine.batch_idx, engine.global_step
            engine.current_epoch, engine.batch_idx, engine.global_step = at
            post()
            if read is not None:
                with engine.timings.phase("step"):  # reading the metrics waits for the device
                    metrics = read()
                self.log(metrics)
            self.hooks("on_train_epoch_end")
            engine.current_epoch, engine.batch_idx, engine.global_step = now
            if another:
                self.hooks("on_train_epoch_start")

        return run

    def end_epoch(self, exhausted: bool, epoch_start: int, at_end: bool = False) -> None:
        """`at_end`: resumed just after the epoch's last batch (so no batch was read)."""
        engine = self.engine
        if not at_end:
            self.check_epoch_read(epoch_start)
        validate_at_end = control.validates_at_epoch_end(
            self.config, self.val_loader, engine.current_epoch
        )
        if validate_at_end or (exhausted and self.epoch_end_reads):
            self.log_window()  # waits for the device: only when something reads the values
        if validate_at_end:  # at the epoch's end, or stopped mid-epoch: still report it
            self.validation_pass(self.val_loader)
        if exhausted:
            self.hooks("on_train_epoch_end")
            engine.current_epoch += 1
            engine.batch_idx = 0

    def check_epoch_read(self, epoch_start: int) -> None:
        """An epoch that produced no batch is an exhausted one-shot iterator: say so."""
        engine = self.engine
        if engine.batch_idx == epoch_start:
            raise ValueError(
                f"train_data produced no batches in epoch {engine.current_epoch}. A one-shot "
                "iterator is exhausted after one epoch: pass a re-iterable (a list, or an "
                "object whose __iter__ starts over) or stop with max_steps."
            )

    def finished(self) -> bool:
        engine, max_epochs = self.engine, self.config.max_epochs
        if engine.should_stop or self.reached_max_steps():
            return True
        return max_epochs is not None and engine.current_epoch >= max_epochs

    def reached_max_steps(self) -> bool:
        max_steps = self.config.max_steps
        return max_steps is not None and self.engine.global_step >= max_steps

    def after_dispatch(self, g0, b0, k, shapes, per_step, windows, closes) -> Any:
        """The host side of a dispatch, as a function (run at once, or once the next dispatch
        is queued when every hook only observes): each step's batch-end hook and each log
        window the dispatch closed, logged at its step, in step order (one read of them)."""
        engine = self.engine
        for x in windows.values() if closes else ():
            x.copy_to_host_async()

        def run() -> None:
            host = {}
            if closes:
                with engine.timings.phase("step"):  # reading the metrics waits for the device
                    host = jax.device_get(windows)
            logs = {
                j: lambda m=m: self.log(self.window.reduce({n: v[m] for n, v in host.items()}))
                for m, j in enumerate(closes)
            }
            replay_ends(self.hooks, engine, g0, b0, k, shapes, per_step, logs)

        return run

    def log_window(self) -> None:
        if len(self.window):
            with self.engine.timings.phase("step"):  # reading the metrics waits for the device
                metrics = self.window.compute()
            self.log(metrics)

    def train_metric_names(self) -> set[str]:
        """Metrics the compiled train step returns (logged every `log_every_n_steps`)."""
        return set(self.train_meta) | (set(self.window.acc) - {COUNT})
