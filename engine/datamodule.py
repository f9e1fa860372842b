"""`DataModule`: the data of a run in one object, for scripts and for the `meshfit` CLI alike."""

from __future__ import annotations

from typing import Any

STAGES = ("fit", "validate", "test", "predict")


class DataModule:
    """Subclass it and return, from each method, any data `Engine` accepts (NumPy arrays, an
    iterable of batches, a random-access source) or None when there is none.

    `setup(stage)` runs first, once per call of `Engine.fit` / `validate` / `test` / `predict`
    (stage "fit", "validate", "test" or "predict"): load or download there, not in `__init__`,
    so a config can build the object cheaply.
    """

    def setup(self, stage: str) -> None:
        """Prepare the data for `stage`."""

    def train_data(self) -> Any:
        return None

    def val_data(self) -> Any:
        return None

    def test_data(self) -> Any:
        return None

    def predict_data(self) -> Any:
        return None


def data_for(datamodule: DataModule | None, stage: str, given: Any, method: str, what: str) -> Any:
    """`given` if not None, else `datamodule.<method>()` after `setup(stage)`; a clear error
    when both or neither are given."""
    if datamodule is None:
        if given is None:
            raise TypeError(f"{what}: pass the data, or datamodule=<a meshfit.DataModule>.")
        return given
    if not isinstance(datamodule, DataModule):
        raise TypeError(
            f"{what}: datamodule must be a meshfit.DataModule, got {type(datamodule).__name__}."
        )
    if given is not None:
        raise TypeError(f"{what}: pass either the data or datamodule=..., not both.")
    datamodule.setup(stage)
    data = getattr(datamodule, method)()
    if data is None:
        raise ValueError(f"{what}: {type(datamodule).__name__}.{method}() returned None.")
    return data
