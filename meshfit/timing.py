"""`meshfit.timing`: host-side phase timing (the code lives in `meshfit.engine.run.timing`)."""

from meshfit.engine.run.timing import PHASES, PhaseTimer

__all__ = ["PHASES", "PhaseTimer"]
