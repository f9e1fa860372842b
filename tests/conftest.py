"""Test setup: 8 virtual CPU devices before JAX initialises, fast collective timeouts."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
    flags += " --xla_cpu_collective_call_terminate_timeout_seconds=30"
os.environ["XLA_FLAGS"] = flags.strip()
# One persistent compilation cache for the whole run (both xdist workers and the child
# processes tests start): the suite compiles the same small programs many times over.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault(
    "MESHFIT_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"meshfit-tests-{_run}")
)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_root(tmp_path_factory, monkeypatch):
    """Run every test in its own directory so ./runs never leaks between tests (nor the
    compilation cache an Engine sets in ./runs/jax_cache). Not tmp_path itself, so a test that
    writes into tmp_path finds there only what it wrote."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    from meshfit.engine import compile_cache

    compile_cache.configure(None)
