"""Logger builders where a YAML node alone can't decide (online vs offline W&B)."""

from __future__ import annotations

import os
from typing import Any


def wandb_logger(offline: bool | None = None, **kwargs: Any):
    """A `WandbLogger`; `offline=None` means online only when an API key is given
    (`WANDB_API_KEY`) or `WANDB_MODE=online` is set, so runs without an account still log."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
    return WandbLogger(offline=offline, **kwargs)
