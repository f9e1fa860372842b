"""Multi-process training with `meshfit launch`: parity with one process, failures, bad setups."""

import os
import queue
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from meshfit.engine.processes import distributed
from meshfit.strategies import available_strategies

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "engine", "mp_train.py")


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHFIT_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = "--xla_cpu_collective_call_terminate_timeout_seconds=30"
    return env


def run(cmd, timeout=180, **env):
    return subprocess.run(
        cmd, env=child_env(**env), capture_output=True, text=True, timeout=timeout
    )


def launch(*args, timeout=180):
    return run([sys.executable, "-m", "meshfit.launch", *args], timeout=timeout)


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    """dp and fsdp (one launch runs both fits): 2 processes x 2 devices = 1 process x 4."""
    strategies = [s for s in ("dp", "fsdp") if s in available_strategies()]
    one, two, names = str(tmp_path / "one"), str(tmp_path / "two"), ",".join(strategies)
    ref = run(
        [sys.executable, "-m", "meshfit.bootstrap", SCRIPT, names, one], MESHFIT_CPU_DEVICES="4"
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    res = launch("--nproc", "2", "--cpu-devices-per-process", "2", SCRIPT, names, two)
    assert res.returncode == 0, res.stdout + res.stderr
    for strategy in strategies:
        assert "[rank 0] process 0 done: 4 devices" in res.stdout
        assert "[rank 1] process 1 done: 4 devices" in res.stdout
        suffix = f"-{strategy}.npz" if len(strategies) > 1 else ".npz"
        a, b = np.load(one + suffix), np.load(two + suffix)
        assert len(a.files) == 4
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0)


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_leave_when_the_launcher_is_killed(tmp_path):
    """SIGKILL of the launcher (it cannot stop its children) still ends them within seconds."""
    script = tmp_path / "wait.py"
    script.write_text("import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshfit.launch", "--nproc", "2", str(script)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    pids, seen = [], []
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:  # a hung start fails here, not later
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if " pid " in f" {line}":
            pids.append(int(line.split()[-1]))
    try:
        assert len(pids) == 2, "the children did not start:\n" + "".join(seen)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p) for p in pids), "children outlived their killed launcher"
    finally:
        for p in pids:
            if not _gone(p):
                os.kill(p, 9)


def test_a_crashing_child_stops_the_launcher(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(
        textwrap.dedent("""
        import time, jax
        print("up", jax.process_index(), flush=True)
        if jax.process_index() == 1:
            raise RuntimeError("child failure")
        time.sleep(300)
    """)
    )
    start = time.monotonic()
    res = launch("--nproc", "2", "--grace-seconds", "5", str(script), timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 1, res.stdout + res.stderr
    assert elapsed < 30
    assert "RuntimeError: child failure" in res.stdout
    assert "rank 1 exited with 1" in res.stderr
    left = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout
    assert left.strip() == ""


@pytest.mark.parametrize(
    "env, match",
    [
        (
            {
                "WORLD_SIZE": "4",
                "RANK": "0",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "1",
                "NNODES": "2",
                "LOCAL_WORLD_SIZE": "3",
            },
            r"WORLD_SIZE=4 but NNODES=2 x LOCAL_WORLD_SIZE=3 = 6",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            r"rank 2 is out of range.*0 to 1",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "1"},
            r"needs a coordinator address.*MASTER_ADDR is not set",
        ),
        ({"WORLD_SIZE": "two", "RANK": "0"}, r"WORLD_SIZE='two' must be an integer"),
        (
            {"MESHFIT_NUM_PROCESSES": "2", "MESHFIT_PROCESS_ID": "0"},
            r"need a coordinator.*MESHFIT_COORDINATOR",
        ),
        (
            {
                "MESHFIT_NUM_PROCESSES": "2",
                "MESHFIT_PROCESS_ID": "0",
                "MESHFIT_COORDINATOR": "nohost",
            },
            "HOST:PORT",
        ),
    ],
)
def test_bad_environment_values(env, match):
    with pytest.raises(ValueError, match=match):
        distributed.layout_from_env(env)


def test_environment_layouts():
    assert distributed.layout_from_env({}) is None
    layout = distributed.layout_from_env(
        {
            "WORLD_SIZE": "4",
            "RANK": "3",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "123",
        }
    )
    assert (layout.coordinator, layout.num_processes, layout.process_id, layout.local_rank) == (
        "10.0.0.1:123",
        4,
        3,
        1,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_coordinator_ports_are_free_and_below_the_ephemeral_range():
    """Ports the kernel hands out for `bind(0)` and outgoing connections can be taken between
    the launcher's pick and the coordinator's bind; the launcher draws below that range."""
    import socket

    from meshfit.engine.processes.launch import LOWEST_PORT, ephemeral_low
    from meshfit.launch import free_port

    low = ephemeral_low()
    assert low > LOWEST_PORT  # read from /proc (Linux: 32768 unless reconfigured)
    ports = [free_port() for _ in range(20)]
    assert all(LOWEST_PORT <= p < low for p in ports), ports
    assert len(set(ports)) > 1  # drawn, not one fixed port
    for p in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free, as promised


def test_unreachable_coordinator_fails_clearly(tmp_path):
    code = "from meshfit import distributed; distributed.initialize(timeout=2)"
    port = __import__("meshfit.launch", fromlist=["free_port"]).free_port()
    res = run(
        [sys.executable, "-c", code],
        timeout=60,
        MESHFIT_NUM_PROCESSES="2",
        MESHFIT_PROCESS_ID="1",
        MESHFIT_COORDINATOR=f"127.0.0.1:{port}",
    )
    assert res.returncode == 1
    assert (
        f"Could not reach the jax.distributed coordinator at 127.0.0.1:{port} within 2 s"
        in res.stderr
    )


def test_a_preempted_child_lets_the_others_finish_and_the_launcher_exits_75(tmp_path):
    script = tmp_path / "preempted.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time, jax
        if jax.process_index() == 0:
            time.sleep(2)  # still writing its part of the checkpoint when rank 1 is done
            print("rank 0 finished its checkpoint", flush=True)
        sys.exit(75)
    """)
    )
    res = launch("--nproc", "2", str(script), timeout=60)
    assert res.returncode == 75, res.stdout + res.stderr
    assert "[rank 0] rank 0 finished its checkpoint" in res.stdout
