"""Engine.predict: every row in input order under every strategy, iterables, the writer, errors."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import Callback, PredictionWriter, read_predictions
from meshfit.strategies import Hybrid, Pipeline
from tests.models import MLP, classification_data, quiet
from tests.strategies.test_pipeline import StackNet

X, Y = classification_data(n=1001)  # 31 batches of 32 and a last one of 9 rows


class StackPredictor(StackNet):
    def __call__(self, x):
        return self.out(self.blocks(self.inp(x)))


def reference(module, x):
    """`module(x)` on one device, no engine."""
    return np.asarray(module(jnp.asarray(x)))


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "hybrid"])
def test_predict_matches_module_row_for_row(strategy):
    module = MLP(nnx.Rngs(0))
    expected = reference(module, X)
    if strategy == "hybrid":
        strategy = Hybrid(data=2, fsdp=2, tensor=2, min_shard_bytes=0)
    engine = Engine(strategy=strategy, max_steps=1, batch_size=32, **quiet())
    out = engine.predict(module, (X, Y))
    assert len(engine.devices) == 8
    assert out.shape == (1001, 4)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "strategy, atol",
    [
        # 4 stages, 2 microbatches of 128 rows: the last batch of 233 rows is padded to 256.
        (Pipeline(stages=4, microbatches=2), 1e-6),
        # 2 stages x data 2, 4 microbatches of 4 rows: XLA:CPU rounds a 4-row matmul
        # differently from a 1001-row one (module(x) itself on 2-row chunks differs by ~3.5e-6).
        (Pipeline(stages=2, data=2), 1e-5),
    ],
    ids=["stages4", "stages2-data2"],
)
def test_predict_pipeline_with_a_stack_pads_the_last_batch_for_microbatches(strategy, atol):
    module = StackPredictor(nnx.Rngs(0))
    expected = reference(module, X)
    batch_size = 256 if strategy.microbatches == 2 else 32
    engine = Engine(strategy=strategy, devices=4, max_steps=1, batch_size=batch_size, **quiet())
    out = engine.predict(module, X)
    assert out.shape == (1001, 4)
    np.testing.assert_allclose(out, expected, atol=atol, rtol=0)
    np.testing.assert_array_equal(out.argmax(-1), expected.argmax(-1))


def test_predict_iterable_of_uneven_batches_and_a_pytree_output():
    class TwoHeads(MLP):
        def predict_step(self, batch):
            logits = self(batch["x"])
            return {"logits": logits, "label": logits.argmax(-1)}

    module = TwoHeads(nnx.Rngs(1))
    expected = reference(module, X)
    sizes = [40, 40, 17, 3]  # 40 is not a multiple of 8 devices: padded to 48
    bounds = np.cumsum([0, *sizes])
    batches = [{"x": X[a:b]} for a, b in itertools.pairwise(bounds)]
    engine = Engine(strategy="dp", max_steps=1, **quiet())
    out = engine.predict(module, batches)
    assert out["logits"].shape == (100, 4) and out["label"].dtype.kind == "i"
    np.testing.assert_allclose(out["logits"], expected[:100], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(out["label"], expected[:100].argmax(-1))


def test_prediction_writer_files_concatenate_to_the_predictions(tmp_path):
    module = MLP(nnx.Rngs(0))
    engine = Engine(strategy="dp", batch_size=64, max_steps=1, **quiet())
    full = engine.predict(module, X)
    writer = PredictionWriter(tmp_path / "preds")
    engine = Engine(strategy="dp", batch_size=64, max_steps=1, callbacks=[writer], **quiet())
    assert engine.predict(module, X, return_predictions=False) is None
    assert len(writer.written) == 16  # ceil(1001 / 64)
    assert writer.written[-1].endswith("rows0000000960-0000001001.npy")
    np.testing.assert_array_equal(read_predictions(tmp_path / "preds"), full)


def test_predict_hooks_get_each_batch_without_padding():
    seen = []

    class Record(Callback):
        def on_predict_start(self, engine):
            seen.append("start")

        def on_predict_batch_end(self, engine, outputs, batch, batch_idx):
            seen.append((batch_idx, outputs.shape[0], engine.predict_rows))

        def on_predict_end(self, engine):
            seen.append("end")

    engine = Engine(strategy="dp", batch_size=400, max_steps=1, callbacks=[Record()], **quiet())
    engine.predict(MLP(nnx.Rngs(0)), X)
    assert seen == [
        "start",
        (0, 400, (0, 400)),
        (1, 400, (400, 800)),
        (2, 201, (800, 1001)),
        "end",
    ]


def test_predict_step_without_a_row_dimension_is_named_before_compiling():
    class Scalar(MLP):
        def predict_step(self, batch):
            return {"logits": self(batch), "mean": self(batch).mean()}

    engine = Engine(strategy="dp", max_steps=1, **quiet())
    with pytest.raises(ValueError, match=r"predict_step returned mean with shape \(\)"):
        engine.predict(Scalar(nnx.Rngs(0)), X)


def test_predict_data_of_the_wrong_structure_fails_clearly():
    engine = Engine(strategy="dp", max_steps=1, **quiet())
    batches = iter([X[:32], X[32:64, :8]])  # the second batch has 8 features, not 16
    with pytest.raises(ValueError, match=r"batch 1 has the structure"):
        engine.predict(MLP(nnx.Rngs(0)), batches)
    with pytest.raises(Exception, match=r"predict_step failed on a batch of structure"):
        engine.predict(MLP(nnx.Rngs(0)), {"x": X})  # self(dict) cannot run a Linear


def test_predict_without_call_or_predict_step_says_what_to_define():
    class NoCall(StackNet):  # StackNet defines no __call__
        pass

    engine = Engine(strategy="dp", max_steps=1, **quiet())
    with pytest.raises(TypeError, match="NoCall has no predict_step and no __call__"):
        engine.predict(NoCall(nnx.Rngs(0)), X)
