"""Test setup: 8 virtual CPU devices before JAX initialises, fast collective timeouts."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_collective_call_terminate_timeout_seconds" not in flags:
    flags += " --xla_cpu_collective_call_terminate_timeout_seconds=30"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_root(tmp_path, monkeypatch):
    """Run every test in its own directory so ./runs never leaks between tests."""
    monkeypatch.chdir(tmp_path)
