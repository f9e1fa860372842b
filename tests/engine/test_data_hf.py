"""A Hugging Face `datasets.Dataset` (numpy format) trains bitwise like the same NumPy arrays
(extra `hf`)."""

import jax
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from tests.engine.data_models import DictMLP
from tests.models import classification_data, quiet

datasets = pytest.importorskip("datasets")


def fit(data, val):
    engine = Engine(strategy="dp", max_epochs=2, batch_size=64, **quiet())
    module = DictMLP(nnx.Rngs(0))
    engine.fit(module, data, val)
    return jax.tree.leaves(nnx.state(module, nnx.Param)), engine.callback_metrics


def test_hf_dataset_equals_numpy_arrays_bitwise():
    x, y = classification_data(n=300)
    arrays, val = {"x": x, "y": y}, {"x": x[:100], "y": y[:100]}
    hf = datasets.Dataset.from_dict(arrays).with_format("numpy")
    hf_val = datasets.Dataset.from_dict(val).with_format("numpy")
    want, want_metrics = fit(arrays, val)
    got, got_metrics = fit(hf, hf_val)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert got_metrics == want_metrics


def test_a_dataset_dict_asks_for_one_split():
    x, y = classification_data(n=64)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": x, "y": y})})
    engine = Engine(max_steps=1, batch_size=8, **quiet())
    with pytest.raises(TypeError, match=r"dict of data sets \(splits \['train'\]\).*ds\['train'\]"):
        engine.fit(DictMLP(nnx.Rngs(0)), splits)


def test_hf_without_numpy_format_says_how_to_fix():
    x, y = classification_data(n=64)
    plain = datasets.Dataset.from_dict({"x": x, "y": y})
    engine = Engine(max_steps=1, batch_size=8, **quiet())
    with pytest.raises(TypeError, match=r"holds a list.*with_format\('numpy'\)"):
        engine.fit(DictMLP(nnx.Rngs(0)), plain)
