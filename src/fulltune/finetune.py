"""Which parameters train: `full` (all), `lora` (peft adapters, merged on export), `qlora` (the same
adapters on a 4-bit NF4 base, bitsandbytes; merged into the dequantized base on export) or `freeze`
(only the top k decoder layers and/or named modules: the seed notes' "task-specific fine-tuning")."""

from __future__ import annotations

import functools
from fnmatch import fnmatchcase

import torch
from omegaconf import DictConfig
from torch import nn

from fulltune.preflight import ConfigError

METHODS = ("full", "lora", "qlora", "freeze")


def apply_finetune(model: nn.Module, cfg: DictConfig | None) -> nn.Module:
    """Mark trainable parameters for the method in `cfg.method`; returns the model to train (a
    `peft.PeftModel` wrapping it for `lora`), in train mode: `from_pretrained` returns eval mode and
    Lightning keeps modules' modes, which would silently switch dropout (LoRA's too) off."""
    model.train()
    method = "full" if cfg is None else cfg.method
    if method == "full":
        model.requires_grad_(True)
        return model
    if method in ("lora", "qlora"):
        if method == "qlora" and next(model.parameters()).device.type != "meta":  # meta: plans count it
            quantize_base(model, cfg.quant_type, cfg.double_quant)
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


def quantize_base(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True) -> nn.Module:
    """QLoRA's base: every nn.Linear of the decoder layers becomes a frozen bitsandbytes 4-bit layer,
    one at a time (the 16/32-bit weight is freed as its codes are made), computing in the weight's
    dtype. Embeddings, norms and the LM head keep their dtype, as in the QLoRA paper."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError("finetune=qlora needs bitsandbytes: pip install 'fulltune[qlora]' (its 4-bit layers run "
                          "on CUDA GPUs and, from bitsandbytes 0.49, on CPU)") from err
    for layer in decoder_layers(model)[1]:
        for name, linear in list(layer.named_modules()):
            if type(linear) is not nn.Linear:
                continue
            weight = linear.weight.detach()
            quantized = _nf4_linear()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=weight.dtype, compress_statistics=double_quant,
                                      quant_type=quant_type, device="meta")
            quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                                 quant_type=quant_type)
            quantized.bias = linear.bias
            layer.set_submodule(name, quantized.to(weight.device))  # .to quantizes
    return model


@functools.cache
def _nf4_linear() -> type:
    """bitsandbytes' Linear4bit that also loads the quantization state it saves (its codes' block
    scales and code book beside `weight`), so checkpoints and `resume` restore a QLoRA base."""
    import bitsandbytes as bnb

    class NF4Linear(bnb.nn.Linear4bit):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs) -> None:
            stats = {k.removeprefix(f"{prefix}weight."): state_dict[k] for k in state_dict
                     if k.startswith(f"{prefix}weight.")}
            if stats:
                codes = state_dict[f"{prefix}weight"]
                device = self.weight.device
                self.weight = bnb.nn.Params4bit.from_prequantized(codes, stats, device=device, module=self)
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{prefix}weight")}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if stats:
                missing_keys.remove(f"{prefix}weight")

    return NF4Linear


def dequantized(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A bitsandbytes 4-bit Linear as a plain nn.Linear of `dtype` (its NF4 codes decoded)."""
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return linear


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
    last), or the model itself for the other methods. A QLoRA base is dequantized first, to the
    adapters' dtype, and each adapter added to its decoded weight: merged into the 4-bit codes, the
    update would be rounded away again."""
    if any(_is_4bit(m) for m in model.modules()):
        _merge_into_dequantized(model)
    merge = getattr(model, "merge_and_unload", None)
    return merge() if merge is not None else model


def _is_4bit(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _merge_into_dequantized(model: nn.Module) -> None:
    """Replace every 4-bit layer (inside a LoRA wrapper: the wrapper, with its update added) by nn.Linear."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and _is_4bit(base):
            adapters = list(module.lora_A)
            dtype = module.lora_A[adapters[0]].weight.dtype
            linear = dequantized(base, dtype)
            with torch.no_grad():
                for adapter in adapters:
                    linear.weight += module.get_delta_weight(adapter).to(dtype)
            model.set_submodule(name, linear)
    for name, module in list(model.named_modules()):
        if _is_4bit(module):
            model.set_submodule(name, dequantized(module, module.compute_dtype or torch.float32))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights counted once."""
    total = trainable = 0
    for param in model.parameters():  # parameters() already yields tied tensors once
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 keeps only a partition in `param`
        if getattr(param, "quant_state", None) is not None:  # bitsandbytes 4-bit: two codes per byte
            numel = param.quant_state.shape.numel()
        total += numel
        trainable += numel if param.requires_grad else 0
    return total, trainable
