"""`meshfit launch`: start N local processes of one script on one `jax.distributed` job.

    meshfit launch --nproc 2 --cpu-devices-per-process 4 examples/digits.py --strategy dp

Each child gets the launcher environment (coordinator, world size, rank) and runs the script
through `meshfit.bootstrap`, which sets up `jax.distributed` before the script's first line.
Output is forwarded each line whole, prefixed with the rank (a progress bar's
carriage-return updates as they arrive, so it stays live); SIGINT/SIGTERM are forwarded; if any child fails, the
others are stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits non-zero.
A child that exits 75 (preempted, after its checkpoint) is not a failure: the others get time to
finish the same checkpoint, and the launcher exits 75 so a scheduler can requeue the job.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from meshfit.engine.checkpoint.preemption import PREEMPTED_EXIT_CODE
from meshfit.engine.processes import distributed

EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST_PORT = 10000  # coordinator ports are drawn from here up to the ephemeral range


def free_port() -> int:
    """A free local TCP port for the coordinator, below the kernel's ephemeral range where it
    has one: a port from that range, once released, can go to another process's `bind(0)` or
    outgoing connection before the coordinator binds it, and a concurrent launch on the same
    port joins the wrong job and waits out the initialization timeout."""
    low = ephemeral_low()
    if low > LOWEST_PORT:
        draw = random.SystemRandom()  # independent of any seed the caller set
        for port in (draw.randrange(LOWEST_PORT, low) for _ in range(64)):
            if _binds(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (0 where it is not known)."""
    try:
        with open(EPHEMERAL_RANGE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="meshfit launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="processes to start on this machine")
    p.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index (default 0)")
    p.add_argument(
        "--coordinator", default=None, help="HOST:PORT of process 0 (default: loopback, free port)"
    )
    p.add_argument(
        "--cpu-devices-per-process", type=int, default=None, help="virtual CPU devices per process"
    )
    p.add_argument(
        "--preempt-wait-seconds",
        type=float,
        default=120.0,
        help=f"after a rank exits {PREEMPTED_EXIT_CODE} (preempted), wait this long for the others",
    )
    p.add_argument(
        "--grace-seconds", type=float, default=10.0, help="wait before SIGKILL when stopping"
    )
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.nproc < 1 or args.nnodes < 1:
        p.error(f"--nproc and --nnodes must be >= 1, got {args.nproc} and {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} is out of range for --nnodes {args.nnodes}")
    if args.nnodes > 1 and not args.coordinator:
        p.error("--nnodes > 1 needs --coordinator HOST:PORT (the machine of node rank 0)")
    if not os.path.exists(args.script):
        p.error(f"script {args.script!r} does not exist")
    return args


class RankOutput:
    """The launcher's stdout, shared by the children, each line and each carriage-return
    segment prefixed with its rank. A plain line is forwarded whole, at its newline (an
    unbuffered child writes `print("pid", 7)` in pieces, which another rank's output could
    split). Text after a carriage return is forwarded as it arrives, so a progress bar stays
    one live line; when another rank writes meanwhile, that line is ended first and continues
    below with its prefix."""

    def __init__(self, stream: Any = None):
        self.stream = stream
        self.lock = threading.Lock()
        self.owner: int | None = None  # the rank whose text is on the current terminal line
        self.fresh: dict[int, bool] = {}  # per rank: the next text starts a new segment
        self.live: dict[int, bool] = {}  # per rank: its current segment follows a "\r"
        self.held: dict[int, str] = {}  # per rank: a plain line's text before its newline

    def write(self, rank: int, text: str) -> None:
        out: list[str] = []
        with self.lock:
            for piece in filter(None, _SEGMENTS.split(text)):
                if piece not in ("\r", "\n") and not self.live.get(rank, False):
                    self.held[rank] = self.held.get(rank, "") + piece
                    continue
                if held := self.held.pop(rank, ""):
                    self._emit(rank, held, out)
                self._emit(rank, piece, out)
                if piece in ("\r", "\n"):
                    self.live[rank] = piece == "\r"
            self._flush(out)

    def end(self, rank: int) -> None:
        """The rank's stream ended: forward what it left without a newline."""
        out: list[str] = []
        with self.lock:
            if held := self.held.pop(rank, ""):
                self._emit(rank, held, out)
            self._flush(out)

    def _emit(self, rank: int, piece: str, out: list[str]) -> None:
        fresh = self.fresh.get(rank, True)
        if piece == "\r":
            if self.owner == rank:
                out.append("\r")
            self.fresh[rank] = True
            return
        if self.owner not in (None, rank):  # end another rank's unfinished line
            out.append("\n")
            self.owner = None
        if piece == "\n":
            out.append("\n" if self.owner == rank else f"[rank {rank}]\n")
            self.owner, self.fresh[rank] = None, True
            return
        if fresh or self.owner != rank:
            out.append(f"[rank {rank}] ")
        out.append(piece)
        self.owner, self.fresh[rank] = rank, False

    def _flush(self, out: list[str]) -> None:
        if out:
            stream = self.stream or sys.stdout
            stream.write("".join(out))
            stream.flush()


_SEGMENTS = re.compile(r"(\r|\n)")


def _pump(stream: Any, rank: int, output: RankOutput) -> None:
    """Forward a child's output as it comes, not line by line (a bar's updates stay live)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        output.write(rank, decoder.decode(chunk))
    if tail := decoder.decode(b"", final=True):
        output.write(rank, tail)
    output.end(rank)
    stream.close()


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every live child's process group, then SIGKILL what is left after `grace` s."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # also reaps grandchildren of finished children
        p.wait()


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    coordinator = args.coordinator or f"127.0.0.1:{free_port()}"
    world = args.nproc * args.nnodes
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    output = RankOutput()
    for local_rank in range(args.nproc):
        rank = args.node_rank * args.nproc + local_rank
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            **{
                distributed.ENV_COORDINATOR: coordinator,
                distributed.ENV_NUM_PROCESSES: str(world),
                distributed.ENV_PROCESS_ID: str(rank),
                distributed.ENV_LOCAL_RANK: str(local_rank),
                distributed.ENV_LAUNCHER_PID: str(os.getpid()),
            },
        )
        if args.cpu_devices_per_process:
            env[distributed.ENV_CPU_DEVICES] = str(args.cpu_devices_per_process)
        cmd = [sys.executable, "-m", "meshfit.engine.processes.bootstrap", args.script, *args.args]
        p = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(p.stdout, rank, output), daemon=True))
        pumps[-1].start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        preempted_at = None
        while True:
            codes = [p.poll() for p in procs]
            failed = next((c for c in codes if c not in (None, 0, PREEMPTED_EXIT_CODE)), None)
            if PREEMPTED_EXIT_CODE in codes and failed is None:
                # A preempted rank has saved its part of the shared checkpoint; the others stop
                # at the same step. Give them time to finish, then report the preemption.
                preempted_at = preempted_at or time.monotonic()
                if all(c is not None for c in codes):
                    return PREEMPTED_EXIT_CODE
                if time.monotonic() - preempted_at < args.preempt_wait_seconds:
                    time.sleep(0.05)
                    continue
                failed = PREEMPTED_EXIT_CODE
            if failed is not None:
                rank = args.node_rank * args.nproc + codes.index(failed)
                sys.stderr.write(
                    f"meshfit launch: rank {rank} exited with {_exit_code(failed)}; stopping the others\n"
                )
                _stop(procs, args.grace_seconds)
                return _exit_code(failed)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
