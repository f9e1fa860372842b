"""`meshfit fit | validate | test | predict --config`: configs, overrides, saved configs, errors."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml

from meshfit.engine.cli import ConfigError, MeshfitCLI

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
CONFIG = os.path.abspath(os.path.join(EXAMPLES, "digits.yaml"))
sys.path.insert(0, os.path.abspath(EXAMPLES))  # the example's model module, as the CLI does
QUICK = [
    "--engine.max_epochs", "2", "--engine.enable_progress_bar", "false",
    "--engine.logger", "false", "--engine.enable_model_summary", "false",
    "--model.init_args.hidden", "32",
]  # fmt: skip


def params(cli):
    return jax.tree.map(np.asarray, cli.model.l1.kernel.value), np.asarray(cli.model.out.bias.value)


def test_fit_writes_config_and_checkpoints_and_the_saved_config_reproduces_the_run(tmp_path):
    cli = MeshfitCLI(
        args=["fit", "--config", CONFIG, *QUICK, "--engine.default_root_dir", str(tmp_path / "a")]
    )
    root = tmp_path / "a"
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["engine"]["max_epochs"] == 2 and saved["model"]["init_args"]["hidden"] == 32
    assert sorted(os.listdir(root / "checkpoints"))  # ModelCheckpoint from the config file
    assert cli.engine.callback_metrics["val_acc"] > 0.8
    # the run's own config refits to bitwise the same parameters
    saved["engine"]["default_root_dir"] = str(tmp_path / "b")
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(saved))
    cli2 = MeshfitCLI(args=["fit", "--config", str(again)])
    for x, y in zip(params(cli), params(cli2)):
        assert np.array_equal(x, y)
    # and the checkpoint's metadata holds the same resolved config
    step = max(os.listdir(root / "checkpoints"), key=int)
    meta = (root / "checkpoints" / step / "meta").glob("*")
    text = "".join(p.read_text() for p in meta if p.is_file())
    assert '"max_epochs": 2' in text and '"hidden": 32' in text
    # `meshfit test --ckpt_path best` on the same config: the best checkpoint's test metrics
    tested = MeshfitCLI(args=["test", "--config", str(root / "config.yaml"), "--ckpt_path", "best"])
    best = cli.engine.callbacks[0].best_model_score  # ModelCheckpoint(monitor="val_acc")
    assert tested.result["test_acc"] == pytest.approx(best, abs=1e-6)  # test data = val data


def test_command_line_wins_over_the_file_and_print_config_lists_every_engine_argument(capsys):
    cli = MeshfitCLI(
        args=["fit", "--config", CONFIG, "--engine.batch_size", "32", "--engine.seed", "3"],
        run=False,
    )
    assert cli.engine.batch_size == 32 and cli.engine.seed == 3
    assert cli.engine.max_epochs == 30  # from the file
    with pytest.raises(SystemExit):
        MeshfitCLI(args=["fit", "--config", CONFIG, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    from meshfit.engine.config import EngineConfig

    assert set(EngineConfig.names()) <= set(printed["engine"])


def test_rngs_come_from_the_seed_as_a_script_would_build_them():
    from digits_module import Classifier  # on sys.path via the config's folder
    from flax import nnx

    cli = MeshfitCLI(args=["fit", "--config", CONFIG, "--seed_everything", "7"], run=False)
    ref = Classifier(nnx.Rngs(7), lr=0.003, steps=690)
    assert np.array_equal(np.asarray(cli.model.l1.kernel.value), np.asarray(ref.l1.kernel.value))
    assert cli.engine.seed == 7


def test_unknown_key_and_wrong_type_are_named_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"'engine.max_epoch'.*Did you mean 'engine.max_epochs'"):
        MeshfitCLI(args=["fit", "--config", CONFIG, "--engine.max_epoch", "3"], run=False)
    with pytest.raises(ConfigError, match=r"engine.max_steps: expected int \| None, got 'abc'"):
        MeshfitCLI(args=["fit", "--config", CONFIG, "--engine.max_steps", "abc"], run=False)
    bad = yaml.safe_load(pathlib.Path(CONFIG).read_text())
    bad["engine"]["callbacks"].insert(
        0, {"class_path": "meshfit.callbacks.EarlyStopping", "init_args": {"monitor": "val_acc"}}
    )
    bad["engine"]["callbacks"][1]["init_args"]["monitr"] = "val_loss"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(
        ConfigError,
        match=r"engine.callbacks\[1\].init_args.monitr: ModelCheckpoint has no argument 'monitr'. Did you mean 'monitor'",
    ):
        MeshfitCLI(args=["fit", "--config", str(path)], run=False)


def test_meshfit_command_validate_prints_metrics(tmp_path):
    """The console command, in a fresh process (one CPU device), untrained weights."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "meshfit.engine.cli", "validate", "--config", CONFIG,
         "--engine.default_root_dir", str(tmp_path), "--engine.enable_progress_bar", "false"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "validate:" in out.stdout and "val_acc:" in out.stdout


def test_unknown_key_in_a_file_is_named_with_the_nearest_valid_ones(tmp_path):
    bad = yaml.safe_load(pathlib.Path(CONFIG).read_text())
    bad["engine"]["max_stepz"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(
        ConfigError, match=r"unknown config key 'engine.max_stepz'. Did you mean 'engine.max_steps'"
    ):
        MeshfitCLI(args=["fit", "--config", str(path)], run=False)


def test_cli_under_launch_with_two_processes_equals_one_process(tmp_path):
    """2 processes x 2 devices (dp) and 1 process x 4 devices give the same weights."""
    from digits_module import Classifier
    from flax import nnx

    from meshfit import load_weights

    script = os.path.abspath(os.path.join(EXAMPLES, "digits_cli.py"))
    common = [script, "fit", "--config", CONFIG, *QUICK, "--engine.strategy", "dp"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.abspath(EXAMPLES)}
    env["XLA_FLAGS"] = "--xla_cpu_collective_call_terminate_timeout_seconds=30"
    runs = {
        "two": [sys.executable, "-m", "meshfit.launch", "--nproc", "2",
                "--cpu-devices-per-process", "2", *common],
        "one": [sys.executable, *common, "--engine.devices", "4"],
    }  # fmt: skip
    weights = {}
    for name, cmd in runs.items():
        root = tmp_path / name
        out = subprocess.run(
            [*cmd, "--engine.default_root_dir", str(root)],
            capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == 0, (name, out.stdout[-1500:], out.stderr[-3000:])
        module = Classifier(nnx.Rngs(1), hidden=32)
        weights[name] = load_weights(module, root / "checkpoints")
    a, b = (nnx.state(weights[k], nnx.Param) for k in ("two", "one"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.max(np.abs(np.asarray(x) - np.asarray(y))) <= 1e-5
