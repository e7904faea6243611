"""Which parameters train: `full` (all of them). LoRA and freeze baselines plug in here."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn


def apply_finetune(model: nn.Module, cfg: DictConfig | None) -> nn.Module:
    """Mark trainable parameters for the method in `cfg.method`; returns the model to train."""
    method = "full" if cfg is None else cfg.method
    if method == "full":
        model.requires_grad_(True)
        return model
    raise ValueError(f"finetune.method={method!r} is not known; choose one of: full")


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights counted once."""
    total = trainable = 0
    for param in model.parameters():  # parameters() already yields tied tensors once
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable
