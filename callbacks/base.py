"""The callback base classes, defined at the bottom layer in `meshfit.engine.hooks`."""

from meshfit.engine.hooks import (
    HOOKS,
    Callback,
    GradFn,
    StepTransform,
    all_finite,
    overridden_hooks,
)

__all__ = ["HOOKS", "Callback", "GradFn", "StepTransform", "all_finite", "overridden_hooks"]
