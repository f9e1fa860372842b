"""Multi-process setup on JAX's own runtime (`jax.distributed`), and rank helpers.

`initialize()` finds the process layout, in order, from: explicit arguments; meshfit's launcher
environment (`MESHFIT_*`); the common `MASTER_ADDR`/`MASTER_PORT`/`WORLD_SIZE`/`RANK`/`LOCAL_RANK`
variables; the cluster environments JAX detects itself (SLURM, Open MPI, Kubernetes). With none
of these it does nothing: a single-process run needs no setup.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jax

# Set by `meshfit launch` in each child.
ENV_COORDINATOR = "MESHFIT_COORDINATOR"
ENV_NUM_PROCESSES = "MESHFIT_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHFIT_PROCESS_ID"
ENV_LOCAL_RANK = "MESHFIT_LOCAL_RANK"
ENV_CPU_DEVICES = "MESHFIT_CPU_DEVICES"
ENV_LAUNCHER_PID = "MESHFIT_LAUNCHER_PID"  # children leave when this process is gone

# Markers of cluster environments that `jax.distributed.initialize()` detects on its own.
_CLUSTER_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME", "TPU_WORKER_HOSTNAMES")


@dataclass(frozen=True)
class ProcessLayout:
    """Where this process sits in the job, and where to find the coordinator."""

    coordinator: str | None
    num_processes: int
    process_id: int
    local_rank: int = 0
    source: str = "explicit"


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from None


def layout_from_env(env: Mapping[str, str] | None = None) -> ProcessLayout | None:
    """The process layout described by the launcher's or the torchrun-style variables, if any."""
    env = os.environ if env is None else env
    if ENV_NUM_PROCESSES in env:
        return _checked(
            env.get(ENV_COORDINATOR),
            _int(env, ENV_NUM_PROCESSES),
            _int(env, ENV_PROCESS_ID),
            int(env.get(ENV_LOCAL_RANK, "0")),
            "meshfit launch",
            ENV_COORDINATOR,
        )
    if "WORLD_SIZE" in env or "RANK" in env:
        world = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
        rank = _int(env, "RANK") if "RANK" in env else 0
        per_node = next((k for k in ("LOCAL_WORLD_SIZE", "NPROC_PER_NODE") if k in env), None)
        if "NNODES" in env and per_node:
            nodes, procs = _int(env, "NNODES"), _int(env, per_node)
            if nodes * procs != world:
                raise ValueError(
                    f"WORLD_SIZE={world} but NNODES={nodes} x {per_node}={procs} = {nodes * procs}. "
                    "Set WORLD_SIZE to the total number of processes (nodes x processes per node)."
                )
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        coordinator = f"{addr}:{port}" if addr and port else None
        if world > 1 and coordinator is None:
            missing = " and ".join(k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k))
            raise ValueError(
                f"WORLD_SIZE={world} needs a coordinator address, but {missing} is not set. "
                "Set MASTER_ADDR to the host of rank 0 and MASTER_PORT to a free port on it."
            )
        return _checked(
            coordinator,
            world,
            rank,
            int(env.get("LOCAL_RANK", "0")),
            "MASTER_ADDR/RANK",
            "MASTER_ADDR",
        )
    return None


def _checked(
    coordinator, num_processes, process_id, local_rank, source, coord_name
) -> ProcessLayout:
    if num_processes < 1:
        raise ValueError(
            f"The number of processes must be >= 1, got {num_processes} (from {source})."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"Process rank {process_id} is out of range for a world of {num_processes} processes "
            f"(from {source}); ranks run from 0 to {num_processes - 1}."
        )
    if num_processes > 1 and not coordinator:
        raise ValueError(
            f"{num_processes} processes need a coordinator address (HOST:PORT of process 0), but "
            f"none was given (from {source}). Set {coord_name}."
        )
    if coordinator and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise ValueError(
            f"Coordinator address {coordinator!r} must look like HOST:PORT, e.g. 10.0.0.1:12355."
        )
    return ProcessLayout(coordinator, num_processes, process_id, local_rank, source)


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Fail clearly (instead of JAX aborting the process) when the coordinator is unreachable."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Could not reach the jax.distributed coordinator at {address} within "
                    f"{timeout:g} s ({exc.strerror or exc}). Check that process 0 is running, and that "
                    "the address and port are right and reachable from this machine."
                ) from None
            time.sleep(0.2)


_layout: ProcessLayout | None = None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_rank: int | None = None,
    cpu_devices: int | None = None,
    timeout: float = 300,
) -> ProcessLayout | None:
    """Set up `jax.distributed` for this process before any device is touched (idempotent).

    Put `meshfit.distributed.initialize()` at the top of a script that a cluster starts once per
    process (SLURM `srun`, several machines by hand); `meshfit launch` does it for you.
    Returns the layout, or None for a single-process run.
    """
    global _layout
    if _layout is not None or jax.distributed.is_initialized():
        return _layout
    env = os.environ
    cpu_devices = cpu_devices or (int(env[ENV_CPU_DEVICES]) if env.get(ENV_CPU_DEVICES) else None)
    if num_processes is not None or coordinator_address is not None:
        layout = _checked(
            coordinator_address,
            num_processes or 1,
            process_id or 0,
            local_rank or 0,
            "arguments",
            "coordinator_address",
        )
    else:
        layout = layout_from_env(env)
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if layout is None:
        if not any(k in env for k in _CLUSTER_MARKERS):
            return None
        _configure_cpu_collectives()
        jax.distributed.initialize(initialization_timeout=int(timeout))
        _layout = ProcessLayout(
            None, jax.process_count(), jax.process_index(), 0, "cluster auto-detect"
        )
        return _layout
    if layout.num_processes == 1:
        _layout = layout
        return layout
    _configure_cpu_collectives()
    if layout.process_id != 0:
        wait_for_coordinator(layout.coordinator, timeout)
    try:
        jax.distributed.initialize(
            layout.coordinator,
            layout.num_processes,
            layout.process_id,
            initialization_timeout=int(timeout),
            heartbeat_timeout_seconds=30,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"jax.distributed could not start for process {layout.process_id} of "
            f"{layout.num_processes} ({layout.source}): {exc}. It must run before JAX touches any "
            "device: put `meshfit.distributed.initialize()` at the top of the script, before "
            "building the module, or start the script with `meshfit launch`."
        ) from exc
    os.environ.setdefault(ENV_LOCAL_RANK, str(layout.local_rank))
    _layout = layout
    return layout


def _configure_cpu_collectives() -> None:
    # Cross-process collectives on the CPU backend need gloo; accelerators ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on the one process that writes logs, progress bars and reports."""
    return process_index() == 0


def local_process_index() -> int:
    """This process's rank on its own machine."""
    if _layout is not None:
        return _layout.local_rank
    for name in (ENV_LOCAL_RANK, "LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def is_local_main_process() -> bool:
    """True on the first process of each machine."""
    return local_process_index() == 0
