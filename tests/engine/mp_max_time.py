"""Two processes under Engine(max_time=...) (run by test_run_control): process 0's clock
decides, so both stop at the same step; each prints it, and the checkpoint of that step."""

import os
import sys
import time

import jax
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint, Timer
from tests.models import MLP, classification_data


class Slow(Callback):
    """Process 1's host is slower than process 0's: their clocks alone would disagree."""

    fusion_safe = True

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        time.sleep(0.02 if jax.process_index() == 1 else 0.005)


def main(directory):
    engine = Engine(
        strategy="dp", max_steps=100_000, batch_size=32, max_time={"seconds": 2},
        callbacks=[Slow(), ModelCheckpoint(directory, every_n_steps=100_000)],
        enable_progress_bar=False, logger=False, enable_model_summary=False,
    )  # fmt: skip
    engine.fit(MLP(nnx.Rngs(0)), classification_data(n=256))
    timer = next(cb for cb in engine.callbacks if isinstance(cb, Timer))
    saved = ",".join(sorted(os.listdir(directory)))
    print(
        f"process {jax.process_index()} stopped at {engine.global_step} "
        f"timer {timer.stopped_step} saved {saved}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
