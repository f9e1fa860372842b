"""Processes: `jax.distributed` setup, the local launcher, its bootstrap, the `meshfit` command."""
