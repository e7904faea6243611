"""Which parameters train: `full` (all), `lora` (peft adapters, merged on export) or `freeze` (only
the top k decoder layers and/or named modules: the seed notes' "task-specific fine-tuning")."""

from __future__ import annotations

from fnmatch import fnmatchcase

from omegaconf import DictConfig
from torch import nn

from fulltune.preflight import ConfigError

METHODS = ("full", "lora", "freeze")


def apply_finetune(model: nn.Module, cfg: DictConfig | None) -> nn.Module:
    """Mark trainable parameters for the method in `cfg.method`; returns the model to train (a
    `peft.PeftModel` wrapping it for `lora`), in train mode: `from_pretrained` returns eval mode and
    Lightning keeps modules' modes, which would silently switch dropout (LoRA's too) off."""
    model.train()
    method = "full" if cfg is None else cfg.method
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "lora":
        return add_lora(model, cfg.r, cfg.alpha, cfg.dropout, list(cfg.target_modules))
    if method == "freeze":
        return freeze_except(model, cfg.top_layers, list(cfg.modules))
    raise ConfigError(f"finetune.method={method!r} is not known; choose one of: {', '.join(METHODS)}")


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap `model` with LoRA adapters (B = 0 at start, so the wrapped model computes what the base
    model did); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"finetune.target_modules: {missing} match no module of this model; its linear layers are "
            f"named {linear}"
        )
    config = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    return get_peft_model(model, config)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks (name, ModuleList): the list with one entry per hidden layer, found
    by shape rather than by attribute name so it works across HF architectures."""
    depth = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return name, module
    raise ConfigError(f"found no list of {depth} decoder layers in {type(model).__name__} (finetune=freeze and "
                      "model.compile need one)")


def freeze_except(model: nn.Module, top_layers: int, modules: list[str]) -> nn.Module:
    """Freeze everything, then unfreeze the top `top_layers` decoder layers and every module whose
    qualified name matches a pattern in `modules` (fnmatch globs, e.g. `model.norm`, `*.mlp`).

    With tied embeddings `lm_head` and the input embedding are one tensor: naming either trains both.
    """
    prefix, layers = decoder_layers(model)
    if not 0 <= top_layers <= len(layers):
        raise ConfigError(f"finetune.top_layers={top_layers}: this model has {len(layers)} decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - top_layers :]:
        layer.requires_grad_(True)
    named = dict(model.named_modules())
    for pattern in modules:
        matched = [name for name in named if name and fnmatchcase(name, pattern)]
        if not matched:
            examples = [n for n in named if n.count(".") <= 1 and n and not n.startswith(f"{prefix}.")]
            raise ConfigError(f"finetune.modules: {pattern!r} matches no module; top-level names: {examples}")
        for name in matched:
            named[name].requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("finetune=freeze trains nothing: set finetune.top_layers > 0 or name finetune.modules")
    return model


def merged_for_export(model: nn.Module) -> nn.Module:
    """The plain HF model to save: LoRA adapters folded into their base weights (in place, so call it
    last), or the model itself for the other methods."""
    merge = getattr(model, "merge_and_unload", None)
    return merge() if merge is not None else model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights counted once."""
    total = trainable = 0
    for param in model.parameters():  # parameters() already yields tied tensors once
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps only a partition in `param`
        total += numel
        trainable += numel if param.requires_grad else 0
    return total, trainable
