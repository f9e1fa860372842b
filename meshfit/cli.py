"""`meshfit.cli`: runs from config files (the code lives in `meshfit.engine.cli`)."""

from meshfit.engine.cli import ConfigError, MeshfitCLI, main

__all__ = ["ConfigError", "MeshfitCLI", "main"]
