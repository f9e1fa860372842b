"""Random-access sources are batched exactly like NumPy arrays: same rows, same order, each
process its own share, O(1) resume at any batch, records checked."""

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.engine.data import ArrayLoader, SourceLoader, make_loader
from tests.engine.data_models import Records, augment
from tests.models import MLP, classification_data, quiet


def fit_params(data, val, **kwargs):
    engine = Engine(strategy="dp", max_epochs=2, batch_size=64, **quiet(**kwargs))
    module = MLP(nnx.Rngs(0))
    engine.fit(module, data, val)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))], engine


def test_sources_train_bitwise_like_the_same_arrays():
    x, y = classification_data(n=300)  # 4 full batches of 64 (44 rows dropped)
    vx, vy = x[:100], y[:100]  # validation keeps the last 36 rows (replicated: 36 % 8 != 0)
    want, ref = fit_params((x, y), (vx, vy))
    for data, val in (
        (grain.MapDataset.source(Records(x, y)), grain.MapDataset.source(Records(vx, vy))),
        (Records(x, y), Records(vx, vy)),
    ):
        got, engine = fit_params(data, val)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        assert engine.callback_metrics == ref.callback_metrics


def two_process_rows(n):
    """rows_for of process 0 and 1 when two processes split each batch in halves."""
    return [lambda m, p=p: (p * m // 2, (p + 1) * m // 2, True) for p in (0, 1)]


@pytest.mark.parametrize("train", [True, False])
def test_each_process_reads_its_half_and_resume_starts_at_the_batch(train):
    x, y = classification_data(n=200)
    arrays = ArrayLoader((x, y), 32, shuffle=train, drop_last=train, seed=4, name="x")
    source = Records(x, y)
    loader = SourceLoader(source, 32, shuffle=train, drop_last=train, seed=4, name="x", threads=0)
    for epoch in (0, 3):
        rows = two_process_rows(32)
        mine = [list(loader.epoch(epoch, 0, r)) for r in rows]
        want = list(arrays.epoch(epoch, 0))
        assert len(mine[0]) == len(mine[1]) == len(want) == (6 if train else 7)
        for a, b, full in zip(*mine, want, strict=True):
            for leaf_a, leaf_b, leaf in zip(a.local, b.local, full.local, strict=True):
                assert np.array_equal(np.concatenate([leaf_a, leaf_b]), leaf)
        source.reads.clear()
        resumed = next(loader.epoch(epoch, 4, None))  # O(1): reads only batch 4 (no threads)
        assert np.array_equal(resumed.local[0], want[4].local[0])
        assert source.reads == arrays.order(epoch)[4 * 32 : 5 * 32].tolist()
    loader.close()


def test_a_grain_random_map_differs_per_epoch_and_repeats_exactly():
    x, y = classification_data(n=128)
    ds = grain.MapDataset.source(Records(x, y)).random_map(augment, seed=1)
    loader = SourceLoader(ds, 64, shuffle=True, drop_last=True, seed=0, name="x")
    e0 = [b.local[0] for b in loader.epoch(0)]
    e1 = [b.local[0] for b in loader.epoch(1)]
    again = [b.local[0] for b in loader.epoch(1)]  # a fresh stream: same epoch, same draws
    order0, order1 = loader.order(0), loader.order(1)
    assert not np.allclose(np.sort(np.concatenate(e0), 0), np.sort(np.concatenate(e1), 0))
    assert all(np.array_equal(a, b) for a, b in zip(e1, again, strict=True))
    noise0 = np.concatenate(e0) - x[order0]
    noise1 = np.concatenate(e1) - x[order1]
    assert 0.05 < noise0.std() < 0.2 and not np.allclose(
        noise0[np.argsort(order0)], noise1[np.argsort(order1)]
    )
    loader.close()


def test_records_of_another_shape_name_the_index_and_both_shapes():
    x, y = classification_data(n=128)
    bad = int(ArrayLoader((x,), 64, shuffle=True, drop_last=True, seed=0, name="x").order(0)[5])

    class Ragged(Records):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x[:15], y) if i == bad else (x, y)

    engine = Engine(max_steps=1, batch_size=64, **quiet())
    with pytest.raises(
        ValueError,
        match=rf"record {bad} is \(float32\[15\], int32\[\]\), but record 0 is \(float32\[16\], int32\[\]\)",
    ):
        engine.fit(MLP(nnx.Rngs(0)), Ragged(x, y))
    assert engine.compiled_step is None


def test_a_record_holding_a_list_says_to_use_numpy():
    class Lists(Records):
        def __getitem__(self, i):
            return {"x": self.x[i].tolist(), "y": self.y[i]}

    x, y = classification_data(n=64)
    with pytest.raises(TypeError, match=r"x\[0\] holds a list.*with_format\('numpy'\)"):
        make_loader(Lists(x, y), 8, train=True, seed=0, process_count=1, name="x")
