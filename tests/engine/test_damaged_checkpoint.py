"""A damaged checkpoint: reported by path with a CheckpointError; "last" falls back to the
newest step that reads completely and resumes exactly from it."""

import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import meshfit
from meshfit import CheckpointError, Engine
from meshfit.callbacks import ModelCheckpoint
from tests.models import MLP, classification_data, quiet

DATA = classification_data(n=256)


def params(module):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def make_engine(root, max_steps, save=True):
    callbacks = [ModelCheckpoint(every_n_steps=10, save_top_k=3)] if save else []
    return Engine(
        strategy="single",
        max_steps=max_steps,
        batch_size=32,
        default_root_dir=root,
        callbacks=callbacks,
        **quiet(enable_model_summary=False),
    )


def train(root, max_steps, ckpt_path=None, save=True):
    module = MLP(nnx.Rngs(0))
    engine = make_engine(root, max_steps, save)
    engine.fit(module, DATA, ckpt_path=ckpt_path)
    return engine, module


def cut_short(path):
    """Truncate a file to half its size, as a full disk or an interrupted copy would."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def largest_array_file(step_dir):
    """The largest data file of the step's array item (orbax's OCDBT `d/` files)."""
    files = [
        os.path.join(d, name)
        for d, _, names in os.walk(os.path.join(step_dir, "train"))
        for name in names
        if os.path.basename(d) == "d"
    ]
    assert files, f"no array data files under {step_dir}"
    return max(files, key=os.path.getsize)


def test_damaged_newest_falls_back_to_the_previous_and_resumes_exactly(tmp_path):
    train(tmp_path / "run", 20)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [10, 20]
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # undamaged, for the reference
    cut_short(largest_array_file(ckpts / "20"))

    with pytest.raises(CheckpointError, match=re.escape(f"Checkpoint {ckpts / '20'} is damaged")):
        train(tmp_path / "run", 30, ckpt_path=ckpts / "20")  # an explicit step: no fallback
    with pytest.warns(
        UserWarning, match=re.escape(f"skipping damaged checkpoint(s) {ckpts / '20'} (")
    ):
        engine, module = train(tmp_path / "run", 30, ckpt_path="last")
    assert engine.global_step == 30

    _, from_10 = train(tmp_path / "copy", 30, ckpt_path=tmp_path / "copy" / "checkpoints" / "10")
    _, uninterrupted = train(tmp_path / "ref", 30, save=False)
    for a, b, c in zip(params(from_10), params(module), params(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)  # resumed from step 10: bitwise the same run
        np.testing.assert_array_equal(c, b)


def test_the_error_is_one_clear_line_without_the_raw_tensorstore_chain(tmp_path):
    train(tmp_path, 10)
    step = tmp_path / "checkpoints" / "10"
    cut_short(largest_array_file(step))
    with pytest.raises(CheckpointError) as info:
        train(tmp_path, 20, ckpt_path=step)
    message = str(info.value)
    assert message.startswith(f"Checkpoint {step} is damaged: its arrays or metadata could not")
    assert "\n" not in message and len(message) < 600, message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert info.value.original is not None  # the raw error stays available for debugging


def test_damaged_metadata_counts_as_damaged(tmp_path):
    train(tmp_path, 20)
    ckpts = tmp_path / "checkpoints"
    cut_short(ckpts / "20" / "meta" / "metadata")
    with pytest.warns(UserWarning, match="skipping damaged"):
        engine, _ = train(tmp_path, 20, ckpt_path="last")
    assert engine.global_step == 20  # resumed at 10 and trained the last 10 steps
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpts / '20'} is damaged")):
        meshfit.load_weights(MLP(nnx.Rngs(1)), ckpts / "20")
    module = MLP(nnx.Rngs(1))
    with pytest.warns(UserWarning, match=re.escape(f"using {ckpts / '10'}")):
        make_engine(tmp_path, 20).validate(module, DATA, ckpt_path="last")
    step_10 = meshfit.load_weights(MLP(nnx.Rngs(2)), ckpts / "10")
    for a, b in zip(params(step_10), params(module), strict=True):
        np.testing.assert_array_equal(a, b)  # evaluation took step 10's weights


def test_all_damaged_raises_naming_every_path_and_leaves_nothing_half_read(tmp_path):
    train(tmp_path, 20)
    ckpts = tmp_path / "checkpoints"
    for step in ("10", "20"):
        cut_short(largest_array_file(ckpts / step))
    module = MLP(nnx.Rngs(0))
    before = params(module)
    engine = make_engine(tmp_path, 30)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* reads completely") as info:
        engine.fit(module, DATA, ckpt_path="last")
    assert str(ckpts / "10") in str(info.value) and str(ckpts / "20") in str(info.value)
    assert engine.global_step == 0  # no host state of a damaged step was taken over
    for a, b in zip(before, params(module), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpts / '20'} is damaged")):
        meshfit.load_weights(module, ckpts / "20")
    for a, b in zip(before, params(module), strict=True):
        np.testing.assert_array_equal(a, b)  # load_weights changed nothing either
