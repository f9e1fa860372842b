"""Console output: the hardware line and model summary come before the progress bar."""

import sys

from flax import nnx

from meshfit import Engine
from meshfit.callbacks import ProgressBar
from tests.models import MLP, classification_data


def test_reports_print_before_the_bar_appears(tmp_path, capsys):
    x, y = classification_data(n=128)
    engine = Engine(
        strategy="single",
        max_epochs=1,
        batch_size=32,
        log_every_n_steps=2,
        default_root_dir=str(tmp_path),
        logger=False,
        callbacks=[ProgressBar(file=sys.stdout)],  # the captured stdout, shared with print
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y), val_data=(x[:32], y[:32]))
    out = capsys.readouterr().out
    hardware, summary = out.index("[meshfit] hardware"), out.index("model summary")
    bar = out.index("Epoch 1/1")
    assert hardware < summary < bar
    assert "\n" not in out[bar:].rstrip("\n")  # one bar, validation included, closed once
    assert "loss=" in out[bar:] and "4/4" in out[bar:]
