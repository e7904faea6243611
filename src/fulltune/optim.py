"""Optimizer parameter groups, the optimizer a precision can step, and warmup LR schedules."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from fulltune.preflight import ConfigError
from fulltune.step_in_backward import StepInBackward

BF16_COMPENSATION = ("auto", "stochastic_rounding", "off")
_TORCHAO_ADAMW_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad"}


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


def optimizer_for_precision(node: DictConfig, precision: str, strategy: Any) -> functools.partial:
    """The optimizer factory of `node` (a conf/optimizer node) once `bf16_compensation` is decided,
    wrapped in `StepInBackward` under `optimizer.step_in_backward=true`.

    Under bf16-true the weights themselves are bf16 and torch's AdamW rounds every new weight to the
    nearest bf16: a step under half an ulp (0.02 has an ulp of ~1.2e-4; every step at lr 2e-5) is lost.
    `auto` therefore steps torchao's AdamW clone with stochastic rounding there, which keeps those
    updates on average (its states stay bf16, as the memory plan counts them), and turns on the same
    rounding in torchao's low-bit AdamWs (`optimizer=adamw8bit`, ...); not under DeepSpeed, which
    already steps fp32 master weights. `off` keeps the configured optimizer as it is. The choice
    replaces `auto` in `node`, so the run's config.yaml records it, and is logged once on rank 0.
    """
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.utilities import rank_zero_info

    factory = instantiate(node)
    keywords = dict(factory.keywords)
    requested = keywords.pop("bf16_compensation", "auto")
    in_backward = keywords.pop("step_in_backward", False)
    name = factory.func.__name__
    if requested not in BF16_COMPENSATION:
        raise ConfigError(f"optimizer.bf16_compensation={requested!r}: use one of {', '.join(BF16_COMPENSATION)}")
    deepspeed = isinstance(strategy, DeepSpeedStrategy)
    bf16_weights = precision == "bf16-true" and not deepspeed
    choice = requested if requested != "auto" else ("stochastic_rounding" if bf16_weights else "off")
    with open_dict(node):
        node.bf16_compensation = choice
    low_bit = factory.func.__module__.startswith("torchao.optim")  # AdamW8bit / AdamW4bit / AdamWFp8
    if choice == "off":
        if precision == "bf16-true":
            rank_zero_info(f"optimizer: {name} on DeepSpeed's fp32 master weights (bf16-true needs no compensation)"
                           if deepspeed else f"optimizer: plain {name} on bf16 weights "
                           "(optimizer.bf16_compensation=off): updates under half a bf16 ulp are lost")
        chosen = functools.partial(factory.func, *factory.args, **keywords)
    elif not bf16_weights:
        raise ConfigError(f"optimizer.bf16_compensation=stochastic_rounding needs bf16 weights, but precision="
                          f"{precision}{' under DeepSpeed (fp32 master weights)' if deepspeed else ''} has none; "
                          "use optimizer.bf16_compensation=auto")
    elif low_bit:
        rank_zero_info(f"optimizer: torchao {name} with bf16 stochastic rounding")
        chosen = functools.partial(factory.func, *factory.args, bf16_stochastic_round=True, **keywords)
    else:
        chosen = _stochastic_rounding_adamw(factory, keywords)
    chosen = functools.partial(with_plain_state, factory=chosen) if low_bit else chosen
    return functools.partial(StepInBackward, factory=chosen) if in_backward else chosen


def optimizer_keywords(factory: functools.partial) -> dict[str, Any]:
    """The hyper-parameters of the optimizer a factory builds, under any wrappers (`factory=`)."""
    while "factory" in factory.keywords:
        factory = factory.keywords["factory"]
    return factory.keywords


def with_plain_state(params: Any, factory: functools.partial) -> torch.optim.Optimizer:
    """A torchao low-bit optimizer whose state dict holds plain tensors: its quantized states (tensor
    subclasses) go into checkpoints as their codes, scales and attributes, and come back as
    subclasses on load. Lightning loads checkpoints with a `map_location` function, with which torch
    cannot rebuild a tensor subclass, so otherwise no run with these optimizers could resume."""
    optimizer = factory(params)
    optimizer.register_state_dict_post_hook(_flatten_states)
    optimizer.register_load_state_dict_pre_hook(_unflatten_states)
    return optimizer


def _flatten_states(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if not hasattr(value, "__tensor_flatten__"):
            return value
        names, attributes = value.__tensor_flatten__()
        return {"subclass": type(value).__name__, "attributes": list(attributes),
                "tensors": {name: getattr(value, name) for name in names}}

    # new dicts: the packed state holds the optimizer's live per-parameter dicts
    state_dict["state"] = {i: {k: plain(v) for k, v in state.items()} for i, state in state_dict["state"].items()}
    return state_dict


def _unflatten_states(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    import torchao.optim.subclass_4bit as four
    import torchao.optim.subclass_8bit as eight
    import torchao.optim.subclass_fp8 as fp8

    classes = {"OptimState8bit": eight.OptimState8bit, "OptimState4bit": four.OptimState4bit,
               "OptimStateFp8": fp8.OptimStateFp8}
    for state in state_dict["state"].values():
        for key, value in state.items():
            if isinstance(value, dict) and "subclass" in value:
                state[key] = classes[value["subclass"]].__tensor_unflatten__(value["tensors"], value["attributes"])
    return state_dict


def _stochastic_rounding_adamw(factory: functools.partial, keywords: dict[str, Any]) -> functools.partial:
    """torchao's AdamW clone with bf16 stochastic rounding, in place of torch's AdamW."""
    from lightning.pytorch.utilities import rank_zero_info

    if factory.func is not torch.optim.AdamW:
        raise ConfigError(f"precision=bf16-true: {factory.func.__name__} would lose every update under half a bf16 "
                          "ulp and only AdamW has a stochastic-rounding version; use optimizer=adamw (or adamw8bit, "
                          "adamw4bit), precision=bf16_mixed, or accept the loss with ++optimizer.bf16_compensation=off")
    keywords.pop("fused", None)  # how torch's AdamW runs its step, not a hyper-parameter; torchao's is compiled
    keywords.pop("foreach", None)
    if unsupported := sorted(set(keywords) - _TORCHAO_ADAMW_KEYS):
        raise ConfigError(f"optimizer.bf16_compensation=stochastic_rounding steps torchao's AdamW, which takes no "
                          f"{', '.join(unsupported)}: drop them, or set optimizer.bf16_compensation=off")
    from torchao.optim import _AdamW  # torchao's documented AdamW clone (torchao/optim/README.md)

    rank_zero_info("optimizer: torchao AdamW with bf16 stochastic rounding (bf16-true keeps no fp32 weights; "
                   "optimizer.bf16_compensation=off for plain torch AdamW)")
    return functools.partial(_AdamW, bf16_stochastic_round=True, **keywords)


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
