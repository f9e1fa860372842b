"""JAX's persistent compilation cache, pointed at the run's directory by the engine.

With the cache on, a restart or a second run of the same model loads its compiled programs from
disk instead of running XLA again. JAX only caches programs that took at least 1 s to compile;
meshfit lowers that to 0 (and the entry-size floor to none) so the many small programs of a
CPU run are cached too, unless the user set those thresholds themselves. JAX opens its cache
once per process, so a new directory is applied by resetting it (public
`jax.experimental.compilation_cache` API).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

#: When set, the default cache directory of every Engine (instead of `<root>/jax_cache`).
ENV_DIR = "MESHFIT_COMPILATION_CACHE_DIR"
_SET_BY_MESHFIT: list[str] = []  # the directory meshfit last configured, if it still applies


def resolve_cache_dir(value: Any, default_root_dir: str) -> str | None:
    """The directory for `Engine(compilation_cache_dir=value)`: None/True -> under the run's
    root (or `$MESHFIT_COMPILATION_CACHE_DIR`), a path -> that path, False -> None (off). A
    clear error for anything else."""
    if value is False:
        return None
    if value is None or value is True:
        shared = os.environ.get(ENV_DIR)  # e.g. one cache for every run of a CI job
        return os.path.abspath(shared or os.path.join(default_root_dir, "jax_cache"))
    if isinstance(value, str | os.PathLike):
        return os.path.abspath(os.fspath(value))
    raise TypeError(
        f"Engine(compilation_cache_dir=...) expects a directory path, None (default: "
        f"<default_root_dir>/jax_cache) or False (off), got {type(value).__name__}."
    )


def configure(directory: str | None) -> None:
    """Use `directory` as JAX's persistent compilation cache from the next compile on; None
    turns off a cache meshfit set earlier in this process (a cache the user configured
    through JAX is left alone)."""
    current = jax.config.jax_compilation_cache_dir
    if directory is None:
        if _SET_BY_MESHFIT and current == _SET_BY_MESHFIT[-1]:
            jax.config.update("jax_compilation_cache_dir", None)
            jax_cache.reset_cache()
        _SET_BY_MESHFIT.clear()
        return
    os.makedirs(directory, exist_ok=True)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_persistent_cache_min_entry_size_bytes == 0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if current != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax_cache.reset_cache()  # JAX opens its cache once: reopen it at the new directory
    _SET_BY_MESHFIT[:] = [directory]
