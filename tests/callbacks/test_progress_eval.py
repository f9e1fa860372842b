"""The progress bar during Engine.test and Engine.predict: one bar of batches each."""

import io

from flax import nnx

from meshfit import Engine
from meshfit.callbacks import ProgressBar
from tests.engine.test_test import Evaluated
from tests.models import classification_data


def test_progress_bar_counts_test_and_predict_batches():
    out = io.StringIO()
    engine = Engine(
        strategy="dp", batch_size=32, max_steps=1, logger=False, callbacks=[ProgressBar(file=out)]
    )
    x, y = classification_data(n=100)  # 4 batches, the last one of 4 rows
    module = Evaluated(nnx.Rngs(0))
    metrics = engine.test(module, (x, y))
    engine.predict(module, x)
    text = out.getvalue()
    assert "Testing:4batch" in text.replace(" ", "")
    assert f"test_loss={metrics['test_loss']:.4g}" in text
    assert "Predicting:4batch" in text.replace(" ", "")
