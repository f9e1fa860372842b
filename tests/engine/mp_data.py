"""Two processes train from one random-access source; each writes the record ids its devices
got per epoch (run by test_data_processes). `unequal`: process 1's source is one record short."""

import json
import sys

import numpy as np
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback
from tests.engine.data_models import DictMLP
from tests.models import classification_data


class Ids:
    """Record i: {"x", "y", "id": i}."""

    def __init__(self, n):
        self.x, self.y = classification_data(n=n)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "id": np.int32(i)}


class Seen(Callback):
    def __init__(self):
        self.rows = {}

    def on_train_batch_end(self, engine, outputs, batch, batch_idx):
        local = [int(i) for s in batch["id"].addressable_shards for i in np.asarray(s.data)]
        self.rows.setdefault(str(engine.current_epoch), []).extend(local)


def main(out, mode):
    import jax

    n = 100 - (mode == "unequal" and jax.process_index() == 1)
    seen = Seen()
    engine = Engine(
        strategy="dp", max_epochs=2, batch_size=16, enable_progress_bar=False, logger=False,
        callbacks=[seen],
    )  # fmt: skip
    engine.fit(DictMLP(nnx.Rngs(0)), Ids(n))
    with open(f"{out}.{jax.process_index()}.json", "w") as f:
        json.dump(seen.rows, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
