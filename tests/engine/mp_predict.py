"""Predicts 1001 rows in every process of a multi-process run (run by test_predict_distributed):
the gathered result, and each process's own rows through a PredictionWriter."""

import sys

import jax
import numpy as np
from flax import nnx

from meshfit import Engine, PerProcess
from meshfit.callbacks import PredictionWriter
from tests.models import MLP, classification_data


def main(strategy, out):
    x, _ = classification_data(n=1001)
    module = MLP(nnx.Rngs(0))
    kwargs = dict(strategy=strategy, max_steps=1, batch_size=32, enable_progress_bar=False)
    full = Engine(logger=False, **kwargs).predict(module, x)
    writer = PredictionWriter(out + "_files")
    Engine(logger=False, callbacks=[writer], **kwargs).predict(module, x, return_predictions=False)
    # an iterable: each process yields its own rows of every global batch of 64 (last one: 41)
    rank, half = jax.process_index(), 32
    batches = [x[i + rank * half : i + (rank + 1) * half] for i in range(0, 1001, 64)]
    from_iterable = Engine(logger=False, **kwargs).predict(module, PerProcess(batches))
    np.savez(f"{out}_{rank}.npz", full=full, iterable=from_iterable)
    print(f"process {rank} predicted {len(full)} rows on {jax.device_count()} devices", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
