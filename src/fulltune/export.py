"""Export a trained model as an HF directory that plain `transformers` loads.

At the end of a run `ExportAtTrainEnd` writes `<output_dir>/hf` straight from the live model, weights
only, tensor by tensor (gathered from the shards under FSDP2 / ZeRO-3). Afterwards,

    python -m fulltune.export <checkpoint> [--out DIR]

turns any checkpoint a run writes into DIR (safetensors shards + index, config, generation config,
tokenizer) on CPU, holding at most one output shard in memory:

- a Lightning `.ckpt` file (auto, ddp): memory-mapped;
- an FSDP2 DCP directory (`.metadata`, `__<rank>_0.distcp`, `meta.pt`): read tensor by tensor;
- a DeepSpeed ZeRO 1-3 directory (`checkpoint/*_optim_states.pt`): the fp32 master weights, merged lazily.

The model config and tokenizer come from the model spec saved in the checkpoint's hyper-parameters.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from fulltune.errors import USER_ERROR_EXIT
from fulltune.preflight import ConfigError
from fulltune.safe_load import load_checkpoint_file

MODEL_PREFIX = "model."  # CausalLMModule keeps the HF model in `self.model`
SHARD_BYTES = 5 * 10**9  # HF's default `max_shard_size="5GB"`
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Tensors = Iterator[tuple[str, Callable[[], torch.Tensor | None]]]  # (HF name, loader), loaded one at a time


def export_dtype(setting: str, precision: str) -> torch.dtype:
    """The dtype an export writes: `setting` (`fp32|bf16|fp16`), or for `auto` the run's compute dtype,
    read from Lightning's precision string (`bf16-mixed`/`bf16-true` -> bf16, `16-mixed` -> fp16,
    `32-true` -> fp32): a bf16 run ships at half the fp32 size, in what it computed with."""
    if setting == "auto":
        setting = "bf16" if precision.startswith("bf16") else "fp16" if precision.startswith("16") else "fp32"
    if setting not in DTYPES:
        raise ConfigError(f"export_dtype={setting!r} is not known; choose auto, {', '.join(DTYPES)}")
    return DTYPES[setting]


class ExportAtTrainEnd(L.Callback):
    """Writes the HF export when training ends, while the strategy still holds the (possibly sharded)
    model: Lightning tears the strategy down before `fit` returns. Weights only: no optimizer state
    is saved just to be converted (for 7B a full checkpoint is ~80 GB, the bf16 weights 14 GB)."""

    def __init__(
        self, out_dir: str | Path, tokenizer: Any, dtype: str = "auto", eos_token_ids: list[int] | None = None,
    ) -> None:
        export_dtype(dtype, "32-true")  # an unknown value fails now, not after training
        self.out_dir, self.tokenizer, self.dtype, self.eos_token_ids = Path(out_dir), tokenizer, dtype, eos_token_ids
        self.seconds = 0.0  # how long the export took (summary.json's time_s.export)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.export(trainer, module.model)
        trainer.strategy.barrier("export")  # no rank runs ahead into teardown while rank 0 still writes

    def export(self, trainer: L.Trainer, model: nn.Module) -> Path:
        started = time.perf_counter()
        try:
            return self._export(trainer, model)
        finally:
            self.seconds += time.perf_counter() - started

    def _export(self, trainer: L.Trainer, model: nn.Module) -> Path:
        """Every rank makes the same gathers in the same order (they are collectives); rank 0 alone
        keeps each full tensor, for the shard it is writing. Also callable after `fit` for a model
        whose weights are whole on rank 0 (a merged LoRA model)."""
        config = copy.deepcopy(model.config)  # the writer sets dtype and use_cache on it
        with torch.no_grad():
            tensors = as_saved(without_tied_copies(live_tensors(model, keep=trainer.is_global_zero), config), model)
            if not trainer.is_global_zero:
                for _, load in tensors:
                    load()
                return self.out_dir
            return write_hf_dir(
                tensors, config, self.tokenizer, self.out_dir, eos_token_ids=self.eos_token_ids,
                dtype=export_dtype(self.dtype, trainer.precision), generation_config=model.generation_config,
            )


def live_tensors(model: nn.Module, keep: bool = True) -> Tensors:
    """The state dict of a live model, however its strategy holds it, as loaders of full tensors:
    FSDP2 DTensors are all-gathered (`full_tensor`), DeepSpeed ZeRO-3 parameters gathered one at a
    time, replicated ones (single device, DDP, ZeRO-1/2) read as they are. Where not `keep`, a
    gathered tensor is dropped at once (the loader returns None): those ranks only take part."""
    def load(tensor: torch.Tensor) -> torch.Tensor | None:
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            if tensor.device.type != tensor.device_mesh.device_type:  # CPU-offloaded shards: gather on the GPU
                tensor = tensor.to(tensor.device_mesh.device_type)  # (as torch's _gather_state_dict does)
            full = tensor.full_tensor()
            return full if keep else None
        if hasattr(tensor, "ds_id"):  # ZeRO-3: only a partition lives in the parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                return tensor.data.clone() if keep else None
        return tensor

    for name, tensor in model.state_dict(keep_vars=True).items():
        yield name, functools.partial(load, tensor)


# -- reading checkpoints ----------------------------------------------------------------------------


def checkpoint_format(path: Path) -> str:
    """`lightning` (one file), `dcp` (FSDP2 sharded dir) or `deepspeed` (ZeRO dir)."""
    if path.is_file():
        return "lightning"
    if (path / ".metadata").is_file():
        return "dcp"
    if (path / "latest").is_file():
        return "deepspeed"
    raise ValueError(f"{path}: not a checkpoint this project writes (a .ckpt file, an FSDP DCP dir with "
                     "`.metadata`, or a DeepSpeed dir with `latest`)")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], Iterator[tuple[str, Callable[[], torch.Tensor]]]]:
    """(the checkpoint's hyper-parameters, lazy (HF tensor name, loader) pairs of the model's weights)."""
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "lightning":
        ckpt = load_checkpoint_file(path, map_location="cpu", mmap=True)
        state = ckpt["state_dict"]
        return ckpt["hyper_parameters"], _model_tensors({k: (lambda k=k: state[k]) for k in state})
    if kind == "dcp":
        meta = load_checkpoint_file(path / "meta.pt", map_location="cpu")
        return meta["hyper_parameters"], _dcp_tensors(path)
    return _deepspeed_checkpoint(path)


def _model_tensors(loaders: dict[str, Callable[[], torch.Tensor]]) -> Iterator[tuple[str, Callable]]:
    """Keep the HF model's entries, named as HF names them; refuse what a plain HF dir cannot hold."""
    for key, load in loaders.items():
        if not key.startswith(MODEL_PREFIX):
            continue  # the module's own state, such as a regularizer's anchor
        if "lora_" in key or ".base_layer." in key:
            raise ValueError("a LoRA checkpoint: load it into CausalLMModule and export the merged model "
                             "(fulltune.finetune.merged_for_export); this converter writes plain weights only")
        yield key[len(MODEL_PREFIX):], load


def _dcp_tensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """FSDP2 DCP: each tensor read (from every rank's file) on its own, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    prefix = "state_dict."  # ModelParallelStrategy saves {"state_dict": module state, "optimizer_0": ...}

    def load(key: str, info: TensorStorageMetadata) -> torch.Tensor:
        tensor = torch.empty(info.size, dtype=info.properties.dtype)
        dcp.load({key: tensor}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        return tensor

    loaders = {
        key[len(prefix):]: (lambda key=key, info=info: load(key, info))
        for key, info in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(info, TensorStorageMetadata)
    }
    return _model_tensors(loaders)


def _deepspeed_checkpoint(path: Path) -> tuple[dict[str, Any], Iterator[tuple[str, Callable]]]:
    """ZeRO 1-3: fp32 master weights reassembled from every rank's optimizer partition, lazily."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (path / "latest").read_text().strip()
    client_state = torch.load(next((path / tag).glob("*model_states.pt")), map_location="cpu", mmap=True,
                              weights_only=False)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, lazy_mode=True)
    return client_state["hyper_parameters"], _model_tensors({k: v.contiguous for k, v in lazy.items()})


# -- writing an HF directory ------------------------------------------------------------------------


def hf_config(spec: DictConfig) -> Any:
    """The exact HF config of the model a checkpoint holds: the architecture the run resolved and
    saved in its spec (the weights' own config.json, or `config:` for a model built from it)."""
    from fulltune.models import architecture_config

    return architecture_config(spec)


def as_saved(tensors: Tensors, model: nn.Module) -> Tensors:
    """The tensors named and shaped as `save_pretrained` writes them: where transformers converts
    stored tensors on load (MoE experts stored one per expert, fused in memory), its own reverse
    conversion is applied, one tensor of the stream at a time."""
    from fulltune.strategies import weight_conversions

    if not weight_conversions(model):
        yield from tensors
        return
    from transformers.core_model_loading import revert_weight_conversion

    for name, load in tensors:
        tensor = load()
        if tensor is None:  # a rank that only takes part in the gathers
            yield name, lambda: None
            continue
        for saved_name, saved in revert_weight_conversion(model, {name: tensor}).items():
            yield saved_name, functools.partial(lambda t: t, saved)


def tied_copies(config: Any) -> set[str]:
    """Weights that are views of others when the config ties them (lm_head = embeddings): like
    `save_pretrained`, the export leaves them out and `from_pretrained` ties them again."""
    from transformers import AutoModelForCausalLM

    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return set(AutoModelForCausalLM._model_mapping[type(config)]._tied_weights_keys or ())


def without_tied_copies(tensors: Tensors, config: Any) -> Tensors:
    """Leave out the tied copies before anything is loaded: on a live sharded model every rank
    filters the same stream, so all make the same gathers and none gathers a copy."""
    skip = tied_copies(config)
    return ((name, load) for name, load in tensors if name not in skip)


def write_hf_dir(
    tensors: Tensors, config: Any, tokenizer: Any, out_dir: str | Path, shard_bytes: int = SHARD_BYTES,
    eos_token_ids: list[int] | None = None, dtype: torch.dtype | None = None, generation_config: Any = None,
) -> Path:
    """Write safetensors shards (HF names: `model-00001-of-00003.safetensors` + index, or one
    `model.safetensors`), loading tensors one at a time and holding one shard at most. Floating
    tensors are cast to `dtype` one by one as they are loaded (never the whole model at once)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from fulltune.models import stop_ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        old.unlink()
    shards: list[dict[str, str]] = []  # shard index -> names
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(current, out / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        shards.append(dict.fromkeys(current, ""))
        current.clear()

    written = None  # the dtype of the weights, for config.json
    for name, load in tensors:
        tensor = load().detach()
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        tensor = tensor.to("cpu", cast, copy=True, memory_format=torch.contiguous_format)  # own, unshared memory
        written = written or tensor.dtype
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
            size = 0
        current[name] = tensor
        size, total = size + nbytes, total + nbytes
    if current or not shards:
        flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]  # not FSDP's wrapper class
    config.dtype = written
    config.use_cache = True
    config.save_pretrained(out)
    # generation stops at the model's own EOS ids and where training ended completions: `eos_token_ids`
    # (the data's turn end, e.g. `<|im_end|>` on a base model trained with ChatML) or else the tokenizer's EOS
    generation = (GenerationConfig.from_model_config(config) if generation_config is None
                  else copy.deepcopy(generation_config))
    stops = stop_ids(generation, eos_token_ids or [tokenizer.eos_token_id])
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops  # one id as an int, as HF writes it
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, tokenizer: Any = None, shard_bytes: int = SHARD_BYTES,
    eos_token_ids: list[int] | None = None,
) -> Path:
    """Any checkpoint a run writes -> an HF directory (bounded RAM, CPU only). The tokenizer is the
    spec's unless one is given."""
    from transformers import AutoModelForCausalLM

    from fulltune.models import load_tokenizer

    hyper_parameters, tensors = read_checkpoint(checkpoint)
    spec = hyper_parameters["model"]
    config = hf_config(spec)
    with torch.device("meta"):  # the architecture alone, for the names `save_pretrained` gives its tensors
        model = AutoModelForCausalLM.from_config(config)
    return write_hf_dir(
        as_saved(without_tied_copies(tensors, config), model), config, tokenizer or load_tokenizer(spec), out_dir,
        shard_bytes, eos_token_ids,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fulltune.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file, an FSDP DCP dir or a DeepSpeed dir")
    parser.add_argument("--out", type=Path, help="output dir (default: <checkpoint>-hf beside it)")
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 10**9, help="max size of one file (GB)")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_name(args.checkpoint.name.removesuffix(".ckpt") + "-hf")
    try:
        print(export_checkpoint(args.checkpoint, out, shard_bytes=int(args.shard_gb * 10**9)))
    except (ValueError, FileNotFoundError) as err:  # a path that is not a checkpoint: exit as train.py does
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


if __name__ == "__main__":
    main()
