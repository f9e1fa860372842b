"""CSVLogger's table (columns appended, one row per step, truncation on resume) and the
`Engine(logger=...)` forms."""

import csv

import pytest

from meshfit import Engine
from meshfit.callbacks import CSVLogger, ProgressBar, TensorBoardLogger
from meshfit.callbacks.csv_logger import MetricsTable


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_columns_are_appended_and_a_step_keeps_one_row(tmp_path):
    path = str(tmp_path / "metrics.csv")
    table = MetricsTable(path)
    table.add(2, {"loss": 0.5})
    table.add(4, {"loss": 0.25})
    table.add(4, {"val_acc": 0.75})  # a new column, merged into step 4's row
    table.add(4, {"lr": 0.1})  # and another
    table.add(6, {"loss": 0.125, "lr": 0.05})
    table.add(6, {"val_acc": 1 / 3})  # same step, known column: only the last line changes
    table.close()
    assert rows(path) == [
        ["step", "loss", "val_acc", "lr"],
        ["2", "0.5", "", ""],
        ["4", "0.25", "0.75", "0.1"],
        ["6", "0.125", repr(1 / 3), "0.05"],
    ]


def test_reopening_keeps_the_header_and_truncation_drops_later_steps(tmp_path):
    path = str(tmp_path / "metrics.csv")
    table = MetricsTable(path)
    for step in (1, 2, 3):
        table.add(step, {"loss": float(step)})
    table.close()
    table = MetricsTable(path)
    table.truncate_after(1)
    table.add(2, {"loss": 20.0})
    table.add(2, {"acc": 0.5})
    table.close()
    assert rows(path) == [["step", "loss", "acc"], ["1", "1.0", ""], ["2", "20.0", "0.5"]]


def test_engine_logger_argument_forms():
    default = Engine(max_steps=1)
    assert [type(lg) for lg in default.loggers] == [TensorBoardLogger]
    assert Engine(max_steps=1, logger=False).loggers == []
    one = CSVLogger()
    assert Engine(max_steps=1, logger=one).loggers == [one]
    both = [TensorBoardLogger(), CSVLogger()]
    assert Engine(max_steps=1, logger=both).loggers == both
    given = CSVLogger()  # a logger among the callbacks replaces the default
    assert Engine(max_steps=1, callbacks=[given]).loggers == [given]
    assert Engine(max_steps=1, callbacks=[given], logger=[given]).loggers == [given]
    with pytest.raises(TypeError, match=r"True, False, a Logger or a list of Loggers; got str"):
        Engine(max_steps=1, logger="tensorboard")
    with pytest.raises(TypeError, match=r"\['ProgressBar'\]"):
        Engine(max_steps=1, logger=[ProgressBar()])


def test_write_interval_defers_writes_and_the_fit_end_writes_everything(tmp_path):
    from flax import nnx

    from meshfit.callbacks import Callback
    from tests.models import MLP, classification_data

    logger = CSVLogger()
    logger.write_interval_s = 3600.0  # after the first write, nothing until the fit ends

    seen = []

    class Peek(Callback):
        def on_train_batch_end(self, engine, outputs, batch, batch_idx):
            if logger.metrics_path:
                seen.append(len(rows(logger.metrics_path)) - 1)

    x, y = classification_data(n=256)
    engine = Engine(
        strategy="single",
        max_epochs=2,
        batch_size=64,
        log_every_n_steps=2,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        logger=[logger],
        callbacks=[Peek()],
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y), val_data=(x[:64], y[:64]))
    # step 2's row is written at step 3's dispatch end (before Peek's batch end), then nothing
    # until the fit ends
    assert seen == [0, 0, 1, 1, 1, 1, 1, 1]
    assert [r[0] for r in rows(logger.metrics_path)] == ["step", "2", "4", "6", "8"]
