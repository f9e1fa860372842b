"""Trains the test MLP and saves the final parameters from rank 0 (run by test_distributed).

mp_train.py STRATEGY[,STRATEGY...] OUT   (one fit per strategy, saved as OUT-<strategy>.npz
                                         when several are named)
"""

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from meshfit import Engine, distributed
from tests.models import MLP, classification_data


def to_numpy(x):
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def main(strategy, out):
    x, y = classification_data(n=256)
    module = MLP(nnx.Rngs(0))
    engine = Engine(
        strategy=strategy,
        max_steps=10,
        batch_size=32,
        log_every_n_steps=5,
        enable_progress_bar=False,
        logger=False,
    )
    engine.fit(module, (x, y), val_data=(x[:100], y[:100]))
    leaves = [to_numpy(v) for v in jax.tree.leaves(nnx.state(module, nnx.Param))]
    if distributed.is_main_process():
        np.savez(out, *leaves)
        with open(out + ".json", "w") as f:
            json.dump(
                {
                    "metrics": engine.callback_metrics,
                    "processes": jax.process_count(),
                    "devices": jax.device_count(),
                },
                f,
            )
    print(f"process {jax.process_index()} done: {jax.device_count()} devices", flush=True)


if __name__ == "__main__":
    names = sys.argv[1].split(",")
    for name in names:  # one process start-up for several strategies
        main(name, sys.argv[2] if len(names) == 1 else f"{sys.argv[2]}-{name}")
