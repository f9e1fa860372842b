"""Progress bar and TensorBoard: output from process 0 only, scalars at the log cadence."""

import glob
import io
import struct

import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from meshfit import Engine
from meshfit.callbacks import Callback, ProgressBar, TensorBoardLogger
from meshfit.engine.processes import distributed
from tests.models import MLP, classification_data


def read_scalars(log_dir, skip=None):
    """{tag: [(step, value), ...]} from the TFRecord event files in `log_dir` (but those whose
    name ends with `skip`)."""
    scalars = {}
    for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
        if skip and path.endswith(skip):
            continue
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def fit(tmp_path, bar_file):
    x, y = classification_data(n=256)
    engine = Engine(
        strategy="dp",
        max_epochs=2,
        batch_size=64,
        log_every_n_steps=2,
        default_root_dir=str(tmp_path / "runs"),
        callbacks=[ProgressBar(file=bar_file)],
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y), val_data=(x[:64], y[:64]))
    return engine


def test_process_zero_writes_one_bar_and_event_files(tmp_path):
    buf = io.StringIO()
    engine = fit(tmp_path, buf)
    out = buf.getvalue()
    assert "Epoch 2/2" in out and "loss=" in out and "acc=" in out and "step/s" in out
    assert out.count("\n") == 1  # one bar, closed once: validation did not start new lines
    logger = next(cb for cb in engine.callbacks if isinstance(cb, TensorBoardLogger))
    scalars = read_scalars(logger.log_dir)
    assert [s for s, _ in scalars["loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in scalars["val_acc"]] == [4, 8]
    assert scalars["loss"][-1][1] == pytest.approx(engine.callback_metrics["loss"], rel=1e-6)


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "process_index", lambda: 1)
    buf = io.StringIO()
    engine = fit(tmp_path, buf)
    assert not engine.is_global_zero
    assert buf.getvalue() == ""
    assert not glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert "loss" in engine.callback_metrics  # metrics are still global on every process


class Custom(Callback):
    """Writes its own scalar through the logger's SummaryWriter at each epoch's end."""

    epoch_end_reads_metrics = False

    def __init__(self, logger):
        self.logger = logger

    def on_train_epoch_end(self, engine):
        self.logger.writer.add_scalar("custom", 3.0 + engine.current_epoch, engine.global_step)


def test_scalars_are_on_disk_at_each_flush_and_writer_takes_other_summaries(tmp_path):
    """Events are written in the training thread (no queue): with flush_secs=0 an epoch's rows
    are in the file when the next epoch starts; `writer` opens a SummaryWriter on the same
    directory (its own file) for anything else."""
    logger = TensorBoardLogger(save_dir=str(tmp_path), flush_secs=0)
    on_disk = []

    class Peek(Callback):
        def on_train_epoch_start(self, engine):
            if engine.current_epoch:  # the logger's own file (the other one ends in .writer)
                scalars = read_scalars(logger.log_dir, skip=".writer")
                on_disk.append([s for s, _ in scalars["loss"]])

    x, y = classification_data(n=256)
    engine = Engine(
        strategy="single",
        max_epochs=2,
        batch_size=64,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[Peek(), Custom(logger)],
        enable_progress_bar=False,
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y))
    assert on_disk == [[2, 4]]
    scalars = read_scalars(logger.log_dir)
    assert [s for s, _ in scalars["loss"]] == [2, 4, 6, 8]
    assert scalars["custom"] == [(4, 3.0), (8, 4.0)]
    assert len(glob.glob(f"{logger.log_dir}/events.out.tfevents.*")) == 2
