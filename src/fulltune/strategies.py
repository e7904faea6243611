"""Build a Lightning strategy from a `conf/strategy/*.yaml` node."""

from __future__ import annotations

from typing import Any


def build_strategy(name: str, **options: Any):
    """`auto` is Lightning's choice for one device; `ddp` replicates the model on every device.

    DDP uses the subprocess launcher; Lightning re-runs the entry script for ranks > 0 with the
    output dir pinned, so every rank shares one Hydra output dir.
    """
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**options)
    raise ValueError(f"strategy={name!r} is not known; choose one of: auto, ddp")
