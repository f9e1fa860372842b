"""`Engine(compilation_cache_dir=...)`: JAX's persistent compilation cache under the run's root
by default, so a second process skips XLA compilation; off with False; per test directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from meshfit import Engine
from tests.models import MLP, classification_data, quiet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "engine", "cache_script.py")


def first_step(root, cache="on"):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHFIT_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, SCRIPT, str(root), cache],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    found = re.search(r"first_step_s=([\d.]+) hits=(\d+) loss=([\d.]+)", res.stdout)
    return float(found[1]), int(found[2]), found[3]


def test_a_second_process_reaches_its_first_step_faster(tmp_path):
    cold, cold_hits, cold_loss = first_step(tmp_path)
    assert cold_hits == 0 and os.listdir(tmp_path / "jax_cache")
    warm, warm_hits, warm_loss = first_step(tmp_path)
    print(f"time from fit() to the end of the first step: cold {cold:.2f} s, warm {warm:.2f} s")
    assert warm_hits > 0 and warm < cold
    assert warm_loss == cold_loss  # the cached programs compute the same numbers


def test_default_directory_off_and_explicit(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv("MESHFIT_COMPILATION_CACHE_DIR", str(shared))
    assert Engine(max_steps=1, **quiet()).compilation_cache_dir == str(shared)
    monkeypatch.delenv("MESHFIT_COMPILATION_CACHE_DIR")  # (conftest shares one in the suite)
    cwd = Path.cwd()  # tests run in their own directory (conftest)
    engine = Engine(max_steps=1, batch_size=32, **quiet())
    assert engine.compilation_cache_dir == str(cwd / "runs" / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == engine.compilation_cache_dir
    engine.fit(MLP(nnx.Rngs(0)), classification_data(n=64))
    assert any("train_step" in name for name in os.listdir(cwd / "runs" / "jax_cache"))

    mine = tmp_path / "elsewhere"
    engine = Engine(max_steps=1, compilation_cache_dir=mine, **quiet())
    assert jax.config.jax_compilation_cache_dir == str(mine) and mine.is_dir()

    off = Engine(
        max_steps=1, default_root_dir=tmp_path / "off", compilation_cache_dir=False, **quiet()
    )
    assert off.compilation_cache_dir is None and jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "off" / "jax_cache").exists()
    with pytest.raises(TypeError, match=r"compilation_cache_dir=\.\.\..*got int"):
        Engine(max_steps=1, compilation_cache_dir=3)
