"""Task data mixed with pretraining replay: formats, validation, token cache, mixture, packing.

`FineTuneDataModule` is imported lazily so that importing the light parts (validate, demo) stays fast.
"""

from typing import Any

from .validate import DataError

__all__ = ["DataError", "FineTuneDataModule"]


def __getattr__(name: str) -> Any:
    if name == "FineTuneDataModule":
        from .datamodule import FineTuneDataModule

        return FineTuneDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
