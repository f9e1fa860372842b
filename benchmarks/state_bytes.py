"""Per-device train-state bytes (parameters + Adam state) for single / dp / fsdp / hybrid.

Every strategy trains the same annotated MLP for one step (factory path: built sharded); the
largest per-device byte count of `engine.state` is printed as a ratio to the single-device
total. Ideal: dp 1.0, fsdp 1/N, hybrid 1/(fsdp × tensor). N virtual CPU devices (default 8).

    python benchmarks/state_bytes.py [--devices 8] [--width 512] [--depth 4]
"""

from __future__ import annotations

import argparse
import os

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--width", type=int, default=512)
parser.add_argument("--depth", type=int, default=4)
args = parser.parse_args()

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={args.devices}"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=60"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from meshfit import Engine, TrainModule  # noqa: E402
from meshfit.engine.trees import max_device_bytes, tree_bytes  # noqa: E402
from meshfit.strategies import FSDP, DataParallel, Hybrid, SingleDevice  # noqa: E402


class MLP(TrainModule):
    """Alternating column/row tensor-parallel layers (Megatron style), annotated logically."""

    def __init__(self, rngs: nnx.Rngs, width: int, depth: int):
        init = nnx.initializers.lecun_normal()
        layers = []
        for i in range(depth):
            names = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            layers.append(
                nnx.Linear(
                    width,
                    width,
                    kernel_init=nnx.with_partitioning(init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, (names[1],)),
                    rngs=rngs,
                )
            )
        self.layers = nnx.List(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x

    def training_step(self, batch):
        (x,) = batch
        return ((self(x) - x) ** 2).mean()

    def configure_optimizers(self):
        return optax.adam(1e-3)


def measure(strategy) -> tuple[int, int]:
    engine = Engine(
        strategy=strategy,
        max_steps=1,
        batch_size=8 * args.devices,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
    )
    data = (np.random.default_rng(0).normal(size=(8 * args.devices, args.width)).astype("f4"),)
    engine.fit(lambda: MLP(nnx.Rngs(0), args.width, args.depth), data)
    return tree_bytes(engine.state), max_device_bytes(engine.state)


def main() -> None:
    n = len(jax.devices())
    tensor = 2 if n % 2 == 0 and n >= 2 else 1
    strategies = {
        "single": SingleDevice(),
        "dp": DataParallel(),
        "fsdp": FSDP(),
        f"hybrid (data=1, fsdp={n // tensor}, tensor={tensor})": Hybrid(
            data=1, fsdp=n // tensor, tensor=tensor
        ),
        "hybrid (default preset)": Hybrid(),
    }
    baseline = None
    print(f"{n} device(s), MLP width {args.width} depth {args.depth}, Adam")
    print(f"{'strategy':42s} {'per-device bytes':>16s} {'ratio to single':>16s}")
    for name, strategy in strategies.items():
        total, per_device = measure(strategy)
        baseline = baseline or total
        print(f"{name:42s} {per_device:16,d} {per_device / baseline:16.4f}")
    print(f"single-device total: {baseline:,d} bytes; ideal fsdp ratio {1 / n:.4f}")


if __name__ == "__main__":
    main()
