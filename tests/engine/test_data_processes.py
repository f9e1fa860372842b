"""Two processes reading one source: disjoint shares, every row once per epoch; different
sources (numbers of records) are an error on every process before any step."""

import json
import os

import numpy as np

from meshfit.engine.data import epoch_order
from tests.engine.test_distributed import ROOT, launch

SCRIPT = os.path.join(ROOT, "tests", "engine", "mp_data.py")


def test_two_processes_see_every_row_exactly_once_per_epoch(tmp_path):
    out = str(tmp_path / "rows")
    res = launch("--nproc", "2", "--cpu-devices-per-process", "2", SCRIPT, out, "equal")
    assert res.returncode == 0, res.stdout + res.stderr
    seen = []
    for rank in (0, 1):
        with open(f"{out}.{rank}.json") as f:
            seen.append(json.load(f))
    for epoch in ("0", "1"):
        mine, theirs = seen[0][epoch], seen[1][epoch]
        assert len(mine) == len(theirs) == 48 and not set(mine) & set(theirs)
        # 6 batches of 16: the epoch's first 96 rows of the (seed 0, epoch) order, once each
        want = epoch_order(100, 0, int(epoch), True)[:96]
        assert sorted(mine + theirs) == sorted(want.tolist())
    assert seen[0]["0"] != seen[0]["1"]  # reshuffled per epoch


def test_processes_with_different_sources_fail_before_any_step(tmp_path):
    res = launch("--nproc", "2", "--cpu-devices-per-process", "2", SCRIPT, str(tmp_path / "x"),
                 "unequal")  # fmt: skip
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert (
        "train_data: the processes have different numbers of records (process 0: 100, "
        "process 1: 99)" in text
    )
    assert np.all([not os.path.exists(tmp_path / f"x.{r}.json") for r in (0, 1)])
