"""Bad data is answered before any compile, naming what was given and what was expected."""

import pytest
from flax import nnx

from meshfit import Engine
from tests.models import MLP, classification_data, quiet


def rejected(data, match, val=None, error=ValueError, **kwargs):
    engine = Engine(strategy="dp", max_steps=2, **quiet(**kwargs))
    with pytest.raises(error, match=match):
        engine.fit(MLP(nnx.Rngs(0)), data, val)
    assert engine.compiled_step is None


@pytest.mark.parametrize("path", ["data/train.parquet", __import__("pathlib").Path("train.ar")])
def test_a_path_as_data_lists_what_is_accepted(path):
    rejected(path, r"is a (str|PosixPath).*does not open files by name.*NumPy arrays.*"
             r"grain.MapDataset.*ArrayRecordDataSource", error=TypeError)  # fmt: skip


def test_python_lists_say_to_wrap_them_in_np_asarray():
    x, y = classification_data(n=64)
    rejected((x.tolist(), y), r"train_data\[0\] is a Python list of float \(length 64\).*np\.asarray",
             error=TypeError)  # fmt: skip
    rejected(
        {"x": x, "y": y.tolist()}, r"train_data\['y'\] is a Python list of int", error=TypeError
    )


def test_iterable_batches_that_the_devices_cannot_split_are_named():
    x, y = classification_data(n=64)
    batches = [(x[:32], y[:32]), (x[32:42], y[32:42])]  # the second has 10 rows, 8 devices
    engine = Engine(strategy="dp", max_epochs=1, **quiet())
    with pytest.raises(ValueError, match=r"batch 1 of epoch 0 has 10 rows.*8 data-parallel devices "
                       r"cannot split evenly.*multiple of 8.*drop_remainder"):  # fmt: skip
        engine.fit(MLP(nnx.Rngs(0)), batches)
    rejected([(x[:10], y[:10])], r"batch 0 of epoch 0 has 10 rows")  # before compiling


def test_validation_batches_that_do_not_split_are_replicated_not_an_error():
    x, y = classification_data(n=64)
    engine = Engine(strategy="dp", max_steps=2, batch_size=32, **quiet())
    engine.fit(MLP(nnx.Rngs(0)), (x, y), [(x[:10], y[:10]), (x[10:42], y[10:42])])
    assert engine.callback_metrics["val_count"] == 42


def test_validation_data_of_another_structure_is_rejected_before_compiling():
    x, y = classification_data(n=64)
    rejected((x, y), r"val_data rows are \{x: float32\[16\], y: int32\[\]\}, but train_data rows "
             r"are \(float32\[16\], int32\[\]\)", val={"x": x, "y": y}, batch_size=32)  # fmt: skip
    rejected((x, y), r"val_data rows are \(float32\[15\], int32\[\]\)", val=(x[:, :15], y),
             batch_size=32)  # fmt: skip


def test_data_workers_must_be_a_count():
    with pytest.raises(ValueError, match=r"data_workers must be an integer >= 0.*got -1"):
        Engine(max_steps=1, data_workers=-1)
