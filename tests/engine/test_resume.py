"""Resume is bitwise: in a new process, after SIGKILL at a random point, after SIGTERM; reshard."""

import json
import os
import random
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from meshfit import PREEMPTED_EXIT_CODE, Engine
from meshfit.callbacks import ModelCheckpoint
from meshfit.strategies import available_strategies
from tests.engine import resume_script
from tests.models import MLP, classification_data, quiet

SCRIPT = resume_script.__file__
STRATEGIES = ["single", "dp"] + (["fsdp"] if "fsdp" in available_strategies() else [])


def child_env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=8 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=30"
    )
    return env


def start(jobs: list[dict]) -> subprocess.Popen:
    """Our own child process running `jobs` (see resume_script.py)."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, json.dumps(jobs)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    return out


def signal_at(proc: subprocess.Popen, step: int, sig: int, timeout: float = 120) -> str:
    """Send `sig` to our child once it reports `step`; return everything it printed."""
    timer = threading.Timer(timeout, proc.kill)  # a hung child fails the test, never CI
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == f"step {step}":
                proc.send_signal(sig)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines)


def reference(strategy: str, max_steps: int, tmp_path) -> dict:
    """Params of an uninterrupted run, computed in this process."""
    out = str(tmp_path / f"ref-{strategy}-{max_steps}.npz")
    resume_script.run(
        dict(out=out, strategy=strategy, max_steps=max_steps, dir=str(tmp_path / f"r-{strategy}"))
    )
    return dict(np.load(out))


def assert_bitwise(got: dict, want: dict) -> None:
    assert got["step"] == want["step"]
    params = [k for k in want if k.startswith("p")]
    assert params and all(np.array_equal(got[k], want[k]) for k in params)
    assert got["loss"] == want["loss"]  # the unlogged metric window was restored too


def test_resume_in_a_new_process_is_bitwise_for_every_strategy(tmp_path):
    # 7 steps of 5-batch epochs: the checkpoint lands mid-epoch (epoch 1, batch 2), and
    # mid-log-window (logs every 3 steps), then a new process continues to 12.
    jobs = []
    for strategy in STRATEGIES:
        d = str(tmp_path / strategy)
        resume_script.run(dict(strategy=strategy, max_steps=7, dir=d, every_n_steps=2))
        assert sorted(os.listdir(d)) == ["7"]  # save_top_k=1 keeps the newest only
        jobs.append(
            dict(out=str(tmp_path / f"{strategy}.npz"), strategy=strategy, max_steps=12, dir=d)
        )
        jobs[-1]["resume"] = "last"
    finish(start(jobs))
    for strategy in STRATEGIES:
        assert_bitwise(
            dict(np.load(tmp_path / f"{strategy}.npz")), reference(strategy, 12, tmp_path)
        )


def test_sigkill_at_a_random_point_and_sigterm_both_resume_exactly(tmp_path):
    total = 24
    killed_dir, termed_dir = str(tmp_path / "killed"), str(tmp_path / "termed")
    kill_step = random.Random().randint(2, 14)
    # Saving every step keeps an async write in flight nearly all the time, so the SIGKILL
    # very likely lands during one; the SIGTERM'd child saves only when preempted.
    killed = start([dict(max_steps=total, dir=killed_dir, every_n_steps=1, sleep=0.01)])
    termed = start([dict(max_steps=total, dir=termed_dir, sleep=0.05)])
    outputs = {}
    watchers = [
        threading.Thread(
            target=lambda: outputs.update(kill=signal_at(killed, kill_step, signal.SIGKILL))
        ),
        threading.Thread(target=lambda: outputs.update(term=signal_at(termed, 5, signal.SIGTERM))),
    ]  # one reader per child, so each signal lands right when its step is reported
    for w in watchers:
        w.start()
    for w in watchers:
        w.join()
    out_kill, out_term = outputs["kill"], outputs["term"]
    assert killed.returncode == -signal.SIGKILL, out_kill[-2000:]
    assert termed.returncode == PREEMPTED_EXIT_CODE, out_term[-2000:]
    # the preempted child stopped at a step boundary right after the signal, with a checkpoint
    steps = [int(line.split()[1]) for line in out_term.splitlines() if line.startswith("step ")]
    assert 5 <= steps[-1] < total and os.listdir(termed_dir) == [str(steps[-1])]

    resumed = [
        dict(out=str(tmp_path / f"{name}.npz"), max_steps=total, dir=d, resume="last")
        for name, d in (("killed", killed_dir), ("termed", termed_dir))
    ]
    finish(start(resumed))
    want = reference("dp", total, tmp_path)
    assert_bitwise(dict(np.load(tmp_path / "killed.npz")), want)
    assert_bitwise(dict(np.load(tmp_path / "termed.npz")), want)


def _strategy_or_skip(name):
    if name not in available_strategies():
        pytest.skip(f"strategy {name!r} not available")
    return name


@pytest.mark.parametrize(
    "target",
    [("single", None), ("dp", 4), ("hybrid", 8)],
    ids=["single", "dp-4", "hybrid"],
)
def test_restore_reshards_onto_another_strategy(tmp_path, target):
    source = "fsdp" if "fsdp" in available_strategies() else "dp"
    strategy, devices = target
    _strategy_or_skip(strategy)
    data = classification_data(n=256)
    d = tmp_path / "ck"
    writer = Engine(
        strategy=source, max_steps=5, batch_size=64, callbacks=[ModelCheckpoint(d)], **quiet()
    )
    saved = MLP(nnx.Rngs(0))
    writer.fit(saved, data)
    saved_opt = jax.tree.map(np.asarray, writer.state.opt_state)

    reader = Engine(
        strategy=strategy,
        devices=devices,
        max_steps=5,
        batch_size=64,
        callbacks=[ModelCheckpoint(d)],
        **quiet(),
    )
    fresh = MLP(nnx.Rngs(1))
    reader.fit(fresh, data, ckpt_path="last")  # nothing left to train: just the restore
    assert reader.global_step == 5
    got = jax.tree.leaves(nnx.state(fresh, nnx.Param))
    want = jax.tree.leaves(nnx.state(saved, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    for a, b in zip(jax.tree.leaves(reader.state.opt_state), jax.tree.leaves(saved_opt)):
        assert np.array_equal(a, b)
    kernel = reader.state.params["l1"]["kernel"][...]
    assert kernel.sharding.mesh == reader.mesh and reader.mesh.devices.size == (devices or 1)


def test_two_processes_agree_on_preemption_and_save_one_checkpoint(tmp_path):
    """SIGTERM reaches only rank 1; both ranks stop at the same step (the flag is OR-reduced
    every 10 steps), write one checkpoint together and exit with PREEMPTED_EXIT_CODE."""
    from meshfit.launch import free_port

    port = free_port()
    d = str(tmp_path / "mp")
    job = json.dumps([dict(max_steps=60, dir=d, sleep=0.05)])
    procs = []
    for rank in range(2):
        env = child_env()
        env.update(
            PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(SCRIPT))),
            MESHFIT_COORDINATOR=f"127.0.0.1:{port}",
            MESHFIT_NUM_PROCESSES="2",
            MESHFIT_PROCESS_ID=str(rank),
            MESHFIT_LOCAL_RANK=str(rank),
            MESHFIT_CPU_DEVICES="2",
            XLA_FLAGS="--xla_cpu_collective_call_terminate_timeout_seconds=30",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "meshfit.bootstrap", SCRIPT, job],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = {}
    readers = [
        threading.Thread(target=lambda: outputs.update(r0=signal_at(procs[0], -1, 0))),
        threading.Thread(target=lambda: outputs.update(r1=signal_at(procs[1], 3, signal.SIGTERM))),
    ]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    last = []
    for p, out in zip(procs, (outputs["r0"], outputs["r1"])):
        assert p.returncode == PREEMPTED_EXIT_CODE, out[-2000:]
        last.append([line for line in out.splitlines() if line.startswith("step ")][-1])
    assert last[0] == last[1] == "step 10"
    assert os.listdir(d) == ["10"]
    # the two-process checkpoint restores in one process on 4 devices
    engine = resume_script.run(dict(devices=4, max_steps=12, dir=d, resume=os.path.join(d, "10")))
    assert engine.global_step == 12 and int(engine.state.step) == 12  # 10 restored + 2 trained


def test_signal_handler_only_sets_a_flag_and_is_removed_after_fit():
    from meshfit.engine.checkpoint.preemption import PreemptionWatcher

    before = signal.getsignal(signal.SIGUSR1)
    watcher = PreemptionWatcher().install()
    try:
        assert not watcher.requested(1)
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert watcher.requested(2)
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
