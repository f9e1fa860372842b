"""Two processes save with ModelCheckpoint(every_n_seconds=...) (run by test_checkpoint_policies).

Each process prints the steps it saved at: they must be the same.
"""

import sys
import time

import jax
import numpy as np
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, ModelCheckpoint
from tests.models import MLP, classification_data


class SavedSteps(Callback):
    """The steps at which `mc` saved: its list of blocking times grows by one per save, and as
    ModelCheckpoint runs last, a save after step s is seen before step s + 1 (or at teardown)."""

    def __init__(self, mc):
        self.mc, self.steps, self.seen, self.last = mc, [], 0, 0

    def _look(self):
        if len(self.mc.save_blocking_s) > self.seen:
            self.seen = len(self.mc.save_blocking_s)
            self.steps.append(self.last)

    def on_train_batch_start(self, engine, batch, batch_idx):
        self._look()
        time.sleep(0.03)  # steps of ~30 ms: several time-based saves in the run

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        self.last = engine.global_step

    def teardown(self, engine):
        self._look()  # the final save, at the end of fit


def main(directory):
    mc = ModelCheckpoint(directory, every_n_seconds=0.4, save_top_k=-1)
    saves = SavedSteps(mc)
    engine = Engine(
        strategy="dp",
        max_steps=80,
        batch_size=32,
        callbacks=[saves, mc],
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
    )
    module = MLP(nnx.Rngs(0))
    engine.fit(module, classification_data(n=256))
    steps = ",".join(map(str, saves.steps))
    print(f"process {jax.process_index()} saved at {steps}", flush=True)
    if jax.process_index() == 0:  # dp: the parameters are replicated, each process has them
        params = jax.tree.leaves(nnx.state(module, nnx.Param))
        np.savez(directory + ".npz", *[np.asarray(x.addressable_data(0)) for x in params])


if __name__ == "__main__":
    main(sys.argv[1])
