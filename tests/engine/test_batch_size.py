"""find_batch_size: the answer compiles within the budget and the next size up does not."""

import functools

import pytest
from flax import nnx

from meshfit import BatchSizeEstimate, Engine, find_batch_size
from meshfit.engine.batch_size import search_largest
from meshfit.engine.hardware import compiled_memory as step_bytes
from tests.models import MLP, classification_data, quiet

DATA = classification_data(n=256, features=32)


def model():
    return MLP(nnx.Rngs(0), features=32, hidden=256, opt="sgd")


@functools.cache
def compiled_bytes(batch_size):
    """Per-device bytes of the step `Engine.fit` itself compiles (one step run)."""
    engine = Engine(
        strategy="dp", max_steps=1, batch_size=batch_size, data_on_device=False, **quiet()
    )
    engine.fit(model(), DATA)
    return step_bytes(engine.compiled_step)


def test_answer_fits_the_budget_and_the_next_size_up_does_not():
    budget = compiled_bytes(200) + 1  # somewhere inside the searchable range (8..256)
    result = find_batch_size(model(), DATA, strategy="dp", memory_budget=budget)
    assert isinstance(result, BatchSizeEstimate)
    batch, used = result
    assert batch % 8 == 0 and 200 <= batch < 256  # a multiple of the data-parallel size
    # checked against what fit() compiles, not against the finder's own numbers
    assert used == compiled_bytes(batch) <= budget
    assert compiled_bytes(batch + 8) > budget


def test_caps_budgets_and_errors():
    data, module = DATA, model()
    # plenty of memory: the cap (rounded down to the data-parallel size) is the answer
    big = find_batch_size(module, data, strategy="dp", memory_budget=2**30, max_batch_size=100)
    assert big.batch_size == 96
    with pytest.raises(ValueError, match=r"do not report.*memory_budget="):
        find_batch_size(module, data, strategy="dp")
    with pytest.raises(ValueError, match=r"even the smallest batch \(8"):
        find_batch_size(module, data, strategy="dp", memory_budget=1000)
    with pytest.raises(ValueError, match="below the 8 data-parallel devices"):
        find_batch_size(module, data, strategy="dp", memory_budget=2**30, max_batch_size=4)


def test_search_uses_few_probes_and_lands_on_the_boundary():
    for per_row, fixed, budget, limit in [(100, 5000, 123_456, 4096), (7, 0, 700, 2**20)]:
        calls = []

        def linear(m, per_row=per_row, fixed=fixed, calls=calls):
            calls.append(m)
            return fixed + per_row * m

        m = search_largest(linear, budget, limit)
        assert linear(m) <= budget < linear(m + 1)
        assert len(set(calls)) <= 5, calls

    def convex(m):
        return m * m

    for budget in (10, 99, 100, 5000):
        m = search_largest(convex, budget, 1000)
        assert convex(m) <= budget < convex(m + 1)
    assert search_largest(convex, 10**9, 1000) == 1000
