"""`meshfit plot`: a PNG with one line per metric, from a CSVLogger or TensorBoard run."""

import pytest
from flax import nnx

from meshfit import Engine
from meshfit.callbacks import CSVLogger, TensorBoardLogger
from meshfit.engine import cli
from meshfit.engine.processes.plot import load_curves, read_csv, render
from tests.models import MLP, classification_data

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    x, y = classification_data(n=256)
    engine = Engine(
        strategy="single",
        max_epochs=3,
        batch_size=32,
        log_every_n_steps=4,
        default_root_dir=str(root / "runs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=[CSVLogger(), TensorBoardLogger()],
    )
    engine.fit(MLP(nnx.Rngs(0)), (x, y), val_data=(x[:64], y[:64]))
    return root, engine.loggers


def test_cli_writes_a_png_with_one_line_per_metric(run, capsys):
    root, (csv_logger, _) = run
    out = root / "curves.png"
    assert cli.main(["plot", csv_logger.log_dir, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    curves = read_csv(csv_logger.metrics_path)
    assert set(curves) == {"loss", "acc", "val_acc", "val_count"}
    fig = render(curves, str(root / "again.png"))
    lines = {line.get_label(): line for ax in fig.axes for line in ax.lines}
    assert sorted(lines) == sorted(curves)  # one line per metric
    steps, values = lines["loss"].get_data()
    assert list(steps) == [s for s, _ in curves["loss"]] == list(range(4, 25, 4))
    assert list(values) == [v for _, v in curves["loss"]]
    acc_panel = next(ax for ax in fig.axes if ax.get_title() == "acc")
    assert {line.get_label() for line in acc_panel.lines} == {"acc", "val_acc"}  # shared


def test_tensorboard_logs_give_the_same_curves(run):
    root, (csv_logger, tb) = run
    from_csv, _ = load_curves(csv_logger.metrics_path)
    from_events, origin = load_curves(tb.log_dir)
    assert origin == tb.log_dir and set(from_events) == set(from_csv)
    for name, points in from_csv.items():
        assert [s for s, _ in from_events[name]] == [s for s, _ in points]
        assert [v for _, v in from_events[name]] == pytest.approx([v for _, v in points])
    assert cli.main(["plot", str(root / "runs"), "--out", str(root / "newest.png")]) == 0


def test_nothing_to_plot_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.csv or TensorBoard event files" in capsys.readouterr().err
