"""Optimizer parameter groups and warmup LR schedules (transformers' schedule functions)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Trainable params in two groups: decayed matrices/embeddings, undecayed 1-d params (biases, norms)."""
    decay, no_decay = [], []
    for param in params:
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions hold flat 1-d data
        (no_decay if ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """Warmup length: explicit steps win; otherwise ceil(ratio x total), as HF TrainingArguments does."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return math.ceil(warmup_ratio * total_steps)


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "cosine",
    warmup_ratio: float = 0.0,
    warmup_steps: int | None = None,
    decay_ratio: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LR schedule: `cosine`, `linear`, `constant_with_warmup` or `warmup_stable_decay`."""
    from transformers import get_scheduler

    warmup = warmup_steps_for(total_steps, warmup_ratio, warmup_steps)
    extra = {}
    if name == "warmup_stable_decay":
        extra = {"num_decay_steps": math.ceil(decay_ratio * total_steps), "min_lr_ratio": min_lr_ratio}
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
