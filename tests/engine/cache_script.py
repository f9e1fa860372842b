"""Time from `fit` to the end of the first step, in a fresh process (run by test_compile_cache).

Prints `first_step_s=<seconds> hits=<persistent cache hits>`.
"""

import sys
import time

import jax
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback
from tests.models import MLP, classification_data


class FirstStep(Callback):
    def __init__(self):
        self.start, self.seconds = time.perf_counter(), None

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        if self.seconds is None:
            jax.block_until_ready(outputs)
            self.seconds = time.perf_counter() - self.start


def main(root, cache):
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None
    )
    first = FirstStep()
    engine = Engine(
        strategy="dp",
        max_steps=2,
        batch_size=32,
        callbacks=[first],
        default_root_dir=root,
        compilation_cache_dir=False if cache == "off" else None,
        enable_progress_bar=False,
        logger=False,
    )
    module = MLP(nnx.Rngs(0), hidden=64)  # built after the Engine: its init programs are cached
    first.start = time.perf_counter()
    engine.fit(module, classification_data(n=128), val_data=classification_data(n=64))
    print(
        f"first_step_s={first.seconds:.3f} hits={len(hits)} loss={engine.callback_metrics['loss']:.6f}"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
