"""Iterables of batches: the checkpoint holds the iterator state after the batches dispatched
steps consumed (not after the Prefetcher's read-ahead); stateful iterators resume without
replay; plain iterables replay, with a warning."""

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import ModelCheckpoint
from meshfit.engine.checkpoint.format import read_meta
from meshfit.engine.checkpoint.format import reader as _reader
from meshfit.engine.data.iterables import to_json
from tests.engine.data_models import Records
from tests.models import MLP, classification_data, quiet


def params(module):
    return [np.asarray(p) for p in jax.tree.leaves(nnx.state(module, nnx.Param))]


def fit(data, max_steps, directory, resume=None):
    engine = Engine(
        max_steps=max_steps,
        batch_size=32,
        callbacks=[ModelCheckpoint(directory, every_n_steps=1, save_top_k=-1)],
        **quiet(),
    )
    module = MLP(nnx.Rngs(0))
    engine.fit(module, data, ckpt_path=resume)
    return params(module)


def test_checkpoint_holds_the_state_after_the_consumed_batches_not_the_prefetched(tmp_path):
    source = Records(*classification_data(n=256))  # 8 batches of 32
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=3)
        .to_iter_dataset(grain.ReadOptions(num_threads=0))
        .batch(32, drop_remainder=True)
    )
    fit(ds, 6, tmp_path)
    assert len(source.reads) >= 4 * 32  # batches were read past the checkpoints below
    manager = _reader(str(tmp_path))
    for step in (1, 2, 3):
        it = iter(ds)
        for _ in range(step):
            next(it)
        saved = read_meta(manager, step)["data"]["states"]
        assert saved == [{"epoch": 0, "batch": step, "iterator": to_json(it.get_state())}]


class Batches:
    """An iterable whose iterator has state_dict()/load_state_dict() (the torch protocol)."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size, self.reads = x, y, size, 0

    def __iter__(self):
        return BatchIterator(self)


class BatchIterator:
    def __init__(self, data):
        self.data, self.i = data, 0

    def __next__(self):
        d = self.data
        if (self.i + 1) * d.size > len(d.x):
            raise StopIteration
        d.reads += 1
        rows = slice(self.i * d.size, (self.i + 1) * d.size)
        self.i += 1
        return d.x[rows], d.y[rows]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_a_state_dict_iterator_resumes_without_replay(tmp_path):
    x, y = classification_data(n=320)  # 10 batches
    want = fit(Batches(x, y, 32), 7, tmp_path / "ref")
    fit(Batches(x, y, 32), 3, tmp_path / "ck")
    data = Batches(x, y, 32)
    got = fit(data, 7, tmp_path / "ck", resume="last")
    assert data.reads <= 4 + 2  # 4 more steps and 2 read ahead: batches 0-2 were not read
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_plain_iterable_replays_with_a_warning(tmp_path):
    x, y = classification_data(n=320)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 320, 32)]
    want = fit(batches, 7, tmp_path / "ref")
    fit(batches, 3, tmp_path / "ck")
    with pytest.warns(UserWarning, match=r"batch 3 of epoch 0.*plain iterable.*first 3 batches "
                      r"will be read again.*get_state\(\)/set_state\(\)"):  # fmt: skip
        got = fit(batches, 7, tmp_path / "ck", resume="last")
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
