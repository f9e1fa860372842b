"""Engine.predict with 2 processes x 2 devices: the full result on both, the writer's files."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshfit.callbacks import read_predictions
from tests.engine.test_distributed import ROOT, launch
from tests.models import MLP, classification_data

SCRIPT = f"{ROOT}/tests/engine/mp_predict.py"


@pytest.mark.parametrize("strategy", ["dp"])
def test_two_processes_both_get_every_row_in_order(strategy, tmp_path):
    out = str(tmp_path / "pred")
    res = launch("--nproc", "2", "--cpu-devices-per-process", "2", SCRIPT, strategy, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "process 1 predicted 1001 rows on 4 devices" in res.stdout
    x, _ = classification_data(n=1001)
    expected = np.asarray(MLP(nnx.Rngs(0))(jnp.asarray(x)))
    a, b = np.load(out + "_0.npz"), np.load(out + "_1.npz")
    np.testing.assert_array_equal(a["full"], b["full"])
    assert a["full"].shape == (1001, 4)
    np.testing.assert_allclose(a["full"], expected, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(read_predictions(out + "_files"), a["full"])
    # PerProcess batches: process 0's 32 rows, then process 1's, per global batch of 64
    order = np.concatenate(
        [np.r_[i : min(i + 32, 1001), i + 32 : min(i + 64, 1001)] for i in range(0, 1001, 64)]
    )
    np.testing.assert_array_equal(a["iterable"], b["iterable"])
    np.testing.assert_allclose(a["iterable"], expected[order], atol=1e-6, rtol=0)
