"""Engine(precision=...): compute in bf16/fp16, master parameters and the loss in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from meshfit import Engine, TrainModule
from meshfit.callbacks import DynamicLossScaling
from tests.models import quiet

load_digits = pytest.importorskip("sklearn.datasets").load_digits


def digits():
    """sklearn's 1797 8x8 handwritten digits: 1500 to train, 297 to validate."""
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


class Digits(TrainModule):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 10, rngs=rngs)
        self.dtypes = {}

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        self.dtypes.update(
            x=x.dtype, y=y.dtype, kernel=self.l1.kernel[...].dtype, logits=logits.dtype
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def validation_step(self, batch):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).mean())

    def configure_optimizers(self):
        return optax.adam(1e-2)


@pytest.mark.parametrize(
    ("precision", "dtype", "callbacks"),
    [
        ("bf16", jnp.bfloat16, []),
        ("fp16", jnp.float16, []),
        ("fp16", jnp.float16, [DynamicLossScaling()]),
    ],
)
def test_half_precision_training_reaches_the_accuracy_target(precision, dtype, callbacks):
    train, val = digits()
    module = Digits(nnx.Rngs(0))
    engine = Engine(
        strategy="dp",
        max_epochs=4,
        batch_size=64,
        precision=precision,
        callbacks=callbacks,
        **quiet(),
    )
    engine.fit(module, train, val_data=val)
    assert engine.callback_metrics["val_acc"] >= 0.93, engine.callback_metrics
    assert engine.callback_metrics["loss"] < 0.3
    # the step computed in the compute dtype (recorded at trace time); labels stay integers ...
    assert module.dtypes == {"x": dtype, "y": jnp.int32, "kernel": dtype, "logits": dtype}
    # ... while the master parameters and the optimizer moments stay float32
    for leaf in jax.tree.leaves((engine.state.params, engine.state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision='fp8'"):
        Engine(precision="fp8", max_steps=1, **quiet())
