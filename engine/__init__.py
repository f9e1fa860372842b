"""The engine's core: the module contract, the train state, the step, the run and its loop,
checkpoints and processes. Public names are re-exported by the top-level `meshfit` package."""

from meshfit.engine.engine import Engine

__all__ = ["Engine"]
