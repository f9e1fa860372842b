"""`meshfit.distributed`: set up `jax.distributed` and ask about processes (documented path;
the code lives in `meshfit.engine.processes.distributed`)."""

from meshfit.engine.processes.distributed import (
    ENV_COORDINATOR,
    ENV_CPU_DEVICES,
    ENV_LOCAL_RANK,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    ProcessLayout,
    initialize,
    is_local_main_process,
    is_main_process,
    layout_from_env,
    local_process_index,
    process_count,
    process_index,
    wait_for_coordinator,
)

__all__ = [
    "ENV_COORDINATOR",
    "ENV_CPU_DEVICES",
    "ENV_LOCAL_RANK",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ProcessLayout",
    "initialize",
    "is_local_main_process",
    "is_main_process",
    "layout_from_env",
    "local_process_index",
    "process_count",
    "process_index",
    "wait_for_coordinator",
]
