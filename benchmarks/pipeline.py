"""Pipeline schedules: measured bubble and step time next to the analytic bubble.

A fixed model (a Stack of residual MLP blocks) and a fixed global batch run forward + backward
through the pipelined Stack for each schedule. The baseline, measured in the same run, is the
same per-device work with no dependencies between stages: every device pushes all M
microbatches through its own layers at once (a shard_map with no permutes). The measured
bubble is 1 − baseline / pipeline: the share of the step spent waiting on fill and drain
(plus the permutes), to compare with GPipe (S−1)/(M+S−1) and circular (S−1)/(M·V+S−1).

    python benchmarks/pipeline.py [--stages 4] [--layers 8] [--dim 256] [--batch 128]

Runs on S virtual CPU devices when there is no accelerator (set before JAX starts). Virtual
CPU devices share the host's cores and every permute is a rendezvous of S host threads, so on
a small (or busy) CPU host the measured bubble is dominated by that overhead and lies well
above the analytic one; on devices that compute concurrently it approaches the analytic value.
With --stages 1 the same script measures the schedule's own bookkeeping overhead (no bubble).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
p.add_argument("--stages", type=int, default=4)
p.add_argument("--layers", type=int, default=8)
p.add_argument("--dim", type=int, default=256)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--repeats", type=int, default=5, help="timed runs per schedule (median)")
args = p.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.stages}"
)

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from meshfit import Stack  # noqa: E402
from meshfit.engine.stack import scan_layers  # noqa: E402
from meshfit.strategies.pipeline import bubble_fraction, pipeline_apply, schedule_ticks  # noqa: E402


class Block(nnx.Module):
    def __init__(self, dim, rngs):
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(x)))


def timed(fn, *xs) -> float:
    """Median seconds of `fn(*xs)` after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*xs))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    stages = args.stages
    mesh = jax.make_mesh(
        (1, stages),
        ("data", "stage"),
        axis_types=(AxisType.Auto,) * 2,
        devices=jax.devices()[:stages],
    )
    stack = Stack(lambda r: Block(args.dim, r), args.layers, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(stack.layers, nnx.Param, ...)
    params = jax.device_put(params, NamedSharding(mesh, P("stage")))
    x = jax.random.normal(jax.random.key(0), (args.batch, args.dim))

    def pipeline_step(repeats, microbatches):
        def loss(params, x):
            y, _ = pipeline_apply(
                graphdef,
                params,
                rest,
                x,
                mesh=mesh,
                repeats=repeats,
                microbatches=microbatches,
                batch_axis="data",
            )
            return (y**2).mean()

        return jax.jit(jax.grad(loss))

    def baseline_step(microbatches):
        """Each device runs its L/S layers over all microbatches, nothing waits on a neighbour."""

        def local(params, xs):
            def one(_, xm):
                y, _ = scan_layers(graphdef, params, rest_local, xm)
                return None, (y**2).sum()

            _, sums = jax.lax.scan(one, None, xs)
            return jax.lax.psum(sums.sum(), "stage")

        rest_local = jax.tree.map(lambda a: a[: args.layers // stages], rest)
        run = jax.shard_map(
            local, mesh=mesh, in_specs=(P("stage"), P()), out_specs=P(), check_vma=False
        )

        def loss(params, x):
            return run(params, x.reshape(microbatches, -1, x.shape[-1])) / x.size

        return jax.jit(jax.grad(loss))

    configs = [("gpipe", 1, m) for m in (stages, 2 * stages, 4 * stages)]
    configs += [("circular", v, m) for v in (2,) for m in (stages, 2 * stages, 4 * stages)]
    configs = [c for c in configs if args.layers % (stages * c[1]) == 0]
    print(
        f"{stages} stages on {jax.devices()[0].platform} ({len(jax.devices())} devices), "
        f"{args.layers} layers of dim {args.dim}, global batch {args.batch}"
    )
    print(
        f"{'schedule':>9} {'V':>2} {'M':>3} {'ticks':>5} {'analytic':>9} {'measured':>9} "
        f"{'step ms':>8} {'no-wait ms':>10}"
    )
    with jax.set_mesh(mesh):
        for schedule, repeats, micro in configs:
            t_pipe = timed(pipeline_step(repeats, micro), params, x)
            t_base = timed(baseline_step(micro), params, x)
            print(
                f"{schedule:>9} {repeats:>2} {micro:>3} "
                f"{schedule_ticks(stages, micro, repeats):>5} "
                f"{bubble_fraction(stages, micro, repeats):>9.1%} {1 - t_base / t_pipe:>9.1%} "
                f"{1e3 * t_pipe:>8.2f} {1e3 * t_base:>10.2f}"
            )


if __name__ == "__main__":
    main()
