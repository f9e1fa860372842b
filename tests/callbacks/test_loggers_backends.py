"""TensorBoard, CSV, W&B (offline) and MLflow (file store) loggers in one fit: the same values
at the same steps in each, read back from their own files; resumed runs continue the same
run without repeated steps; process 1 of 2 writes nothing."""

import glob
import json
import os
import struct
import time

import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import (
    Callback,
    CSVLogger,
    MLflowLogger,
    ModelCheckpoint,
    TensorBoardLogger,
    WandbLogger,
)
from meshfit.engine.processes import distributed
from meshfit.engine.processes.plot import read_csv, read_tensorboard
from tests.callbacks.test_loggers import read_scalars
from tests.models import MLP, classification_data

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # staging, logs
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


class Recorder(Callback):
    """What `on_log` delivered: {metric: [(step, value), ...]}."""

    def __init__(self):
        self.curves = {}

    def on_log(self, engine, metrics):
        for name, value in metrics.items():
            self.curves.setdefault(name, []).append((engine.global_step, value))


def four_loggers(tmp_path, log_checkpoints=False):
    return [
        TensorBoardLogger(),
        CSVLogger(),
        WandbLogger(project="meshfit-test", offline=True, log_checkpoints=log_checkpoints),
        MLflowLogger(
            tracking_uri="file:" + str(tmp_path / "mlruns"), log_checkpoints=log_checkpoints
        ),
    ]


def fit(tmp_path, loggers, max_epochs=2, callbacks=(), ckpt_path=None):
    x, y = classification_data(n=256)
    recorder = Recorder()
    engine = Engine(
        strategy="single",
        max_epochs=max_epochs,
        batch_size=64,
        log_every_n_steps=2,
        default_root_dir=str(tmp_path / "runs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=loggers,
        callbacks=[recorder, *callbacks],
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y), val_data=(x[:64], y[:64]), ckpt_path=ckpt_path)
    return engine, recorder.curves


# ---------------------------------------------------------------------------- reading back
def wandb_records(run_file):
    """The protobuf records of a W&B offline `.wandb` file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, parts, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # block trailer
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            parts = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            parts += chunk
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(parts))
    return out


def finished_records(run_file, timeout=30.0):
    """The records of a W&B offline run file once its exit record is on disk: wandb's service
    process may still be writing the file for a moment after `run.finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_file}: no exit record after {timeout} s")
        time.sleep(0.1)


def wandb_history(run_dirs):
    """{metric: [(step, value), ...]} from the history records of W&B offline runs."""
    curves = {}
    for run_dir in run_dirs:
        (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        for record in finished_records(run_file):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.nested_key[0]: json.loads(item.value_json) for item in record.history.item}
            for name, value in row.items():
                if not name.startswith("_"):
                    curves.setdefault(name, []).append((row["_step"], value))
    return curves


def wandb_run_dirs(tmp_path, run_id):
    return sorted(glob.glob(str(tmp_path / "wandb" / "wandb" / f"offline-run-*-{run_id}")))


def mlflow_history(tmp_path, run_id, name):
    client = MlflowClient(tracking_uri="file:" + str(tmp_path / "mlruns"))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def loggers_of(engine):
    tb, csv_logger, wandb_logger, mlflow_logger = engine.loggers
    return tb, csv_logger, wandb_logger, mlflow_logger


# ---------------------------------------------------------------------------- tests
def test_four_loggers_record_the_same_values_at_the_same_steps(tmp_path):
    engine, logged = fit(tmp_path, four_loggers(tmp_path))
    tb, csv_logger, wandb_logger, mlflow_logger = loggers_of(engine)
    assert [s for s, _ in logged["loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in logged["val_acc"]] == [4, 8]

    csv_curves = read_csv(csv_logger.metrics_path)
    wandb_curves = wandb_history([wandb_logger.log_dir])
    events = read_scalars(tb.log_dir)
    for name in ("loss", "acc", "val_acc"):
        assert csv_curves[name] == logged[name]  # written exactly (repr of floats)
        assert wandb_curves[name] == logged[name]
        assert mlflow_history(tmp_path, mlflow_logger.run_id, name) == logged[name]
        assert [s for s, _ in events[name]] == [s for s, _ in logged[name]]
        assert [v for _, v in events[name]] == pytest.approx([v for _, v in logged[name]])

    # hyperparameters: engine configuration and the module's constructor arguments, once
    client = MlflowClient(tracking_uri="file:" + str(tmp_path / "mlruns"))
    run = client.get_run(mlflow_logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "64" and run.data.params["hidden"] == "32"
    configs = [
        r.config
        for r in finished_records(glob.glob(os.path.join(wandb_logger.log_dir, "run-*.wandb"))[0])
        if r.WhichOneof("record_type") == "config"
    ]
    keys = {u.key for c in configs for u in c.update}
    assert {"batch_size", "hidden", "lr", "strategy"} <= keys
    with open(os.path.join(csv_logger.log_dir, "hparams.yaml")) as f:
        text = f.read()
    assert "batch_size: 64" in text and "hidden: 32" in text and "rngs" not in text


def test_resume_continues_the_same_runs_without_repeating_steps(tmp_path):
    _, reference = fit(tmp_path / "ref", [CSVLogger()], max_epochs=2)
    first, _ = fit(
        tmp_path, four_loggers(tmp_path, True), max_epochs=1, callbacks=[ModelCheckpoint()]
    )
    time.sleep(1.1)  # W&B names offline run directories by the second: one each session
    engine, _ = fit(
        tmp_path,
        four_loggers(tmp_path, True),
        max_epochs=2,
        callbacks=[ModelCheckpoint()],
        ckpt_path="last",
    )
    tb, csv_logger, wandb_logger, mlflow_logger = loggers_of(engine)
    tb0, csv0, wandb0, mlflow0 = loggers_of(first)
    assert (tb.log_dir, csv_logger.log_dir) == (tb0.log_dir, csv0.log_dir)
    assert (wandb_logger.run_id, mlflow_logger.run_id) == (wandb0.run_id, mlflow0.run_id)

    csv_curves = read_csv(csv_logger.metrics_path)
    wandb_curves = wandb_history(wandb_run_dirs(tmp_path, wandb_logger.run_id))
    assert len(wandb_run_dirs(tmp_path, wandb_logger.run_id)) == 2  # one run, two sessions
    tb_curves = read_tensorboard(tb.log_dir)
    for name in ("loss", "val_acc"):
        assert csv_curves[name] == reference[name]  # as if never interrupted, bitwise
        assert wandb_curves[name] == reference[name]
        assert mlflow_history(tmp_path, mlflow_logger.run_id, name) == reference[name]
        assert [s for s, _ in tb_curves[name]] == [s for s, _ in reference[name]]

    client = MlflowClient(tracking_uri="file:" + str(tmp_path / "mlruns"))
    experiment = client.get_experiment_by_name("meshfit")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(mlflow_logger.run_id).info.status == "FINISHED"
    saved = {a.path for a in client.list_artifacts(mlflow_logger.run_id, "checkpoints")}
    assert saved == {"checkpoints/4", "checkpoints/8"}  # each committed save, once
    artifacts = [
        r.artifact
        for d in wandb_run_dirs(tmp_path, wandb_logger.run_id)
        for r in finished_records(glob.glob(os.path.join(d, "run-*.wandb"))[0])
        if r.WhichOneof("record_type") == "artifact"
    ]
    assert [a.type for a in artifacts] == ["model", "model"]
    assert all(a.name == f"model-{wandb_logger.run_id}" for a in artifacts)


def test_resume_from_an_earlier_checkpoint_replaces_what_followed_it(tmp_path):
    """Resumed at step 2 (its log still buffered when saved) after the run went on to 8:
    CSV rows and TensorBoard scalars after step 2 are replaced, MLflow keeps one value per
    step; all equal the uninterrupted run."""
    loggers = lambda: [  # noqa: E731
        TensorBoardLogger(),
        CSVLogger(),
        MLflowLogger(tracking_uri="file:" + str(tmp_path / "mlruns")),
    ]
    every_2 = lambda: ModelCheckpoint(every_n_steps=2, save_top_k=-1)  # noqa: E731
    saver = every_2()
    _, reference = fit(tmp_path, loggers(), callbacks=[saver])
    ckpt = os.path.join(saver.writer.directory, "2")
    engine, _ = fit(tmp_path, loggers(), callbacks=[every_2()], ckpt_path=ckpt)
    tb, csv_logger, mlflow_logger = engine.loggers
    with open(csv_logger.metrics_path) as f:
        rows = f.read().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "2", "4", "6", "8"]
    assert read_csv(csv_logger.metrics_path) == reference
    tb_curves = read_tensorboard(tb.log_dir)
    for name in ("loss", "acc", "val_acc"):
        assert [s for s, _ in tb_curves[name]] == [s for s, _ in reference[name]]
        assert mlflow_history(tmp_path, mlflow_logger.run_id, name) == reference[name]


def test_process_one_of_two_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "process_index", lambda: 1)
    engine, logged = fit(tmp_path, four_loggers(tmp_path))
    assert not engine.is_global_zero and logged["loss"]
    assert all(not logger.is_open and logger.log_dir is None for logger in engine.loggers)
    written = [p for p in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(p)]
    written = [p for p in written if "wandb-home" not in p]
    written = [p for p in written if "jax_cache" not in p]  # JAX's compilation cache, no logger's
    assert written == []


class Crash(Callback):
    """Dies at step 3's dispatch end, before the loggers write step 2's log (one step a
    dispatch: the batch hook is not fusion-safe)."""

    def on_train_batch_end(self, engine, outputs, batch, batch_idx): ...

    def on_train_dispatch_end(self, engine, steps):
        if engine.global_step == 3:
            raise RuntimeError("killed")


def test_a_kill_right_after_a_checkpoint_loses_no_buffered_log(tmp_path):
    """The checkpoint at step 2 is taken while step 2's log waits for step 3 to be written; the
    process dies before that (the logger never flushes): the resumed run writes it."""
    _, reference = fit(tmp_path / "ref", [CSVLogger()])
    killed = CSVLogger()
    killed.on_exception = killed.teardown = lambda *args: None  # dies without flushing
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path, [killed], callbacks=[Crash(), ModelCheckpoint(every_n_steps=2)])
    assert read_csv(killed.metrics_path) == {}  # step 2 never reached the file
    killed.table.close()
    engine, _ = fit(tmp_path, [CSVLogger()], callbacks=[ModelCheckpoint()], ckpt_path="last")
    (csv_logger,) = engine.loggers
    assert csv_logger.log_dir == killed.log_dir
    assert read_csv(csv_logger.metrics_path) == reference
