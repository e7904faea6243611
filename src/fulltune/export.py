"""Export a trained model as an HF directory that plain `transformers` loads.

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
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

MODEL_PREFIX = "model."  # CausalLMModule keeps the HF model in `self.model`
SHARD_BYTES = 2 * 1024**3


def export_hf(model: nn.Module, tokenizer, out_dir: str | Path, eos_token_ids: list[int] | None = None) -> Path:
    """`save_pretrained` safetensors + tokenizer + a generation config that stops where training
    ended completions: `eos_token_ids` (the data's turn end, e.g. `<|im_end|>` on a base model
    trained with ChatML) or else the tokenizer's EOS."""
    out = Path(out_dir)
    model.generation_config.eos_token_id = eos_token_ids or tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


class SaveAtTrainEnd(L.Callback):
    """Writes a checkpoint when training ends, while the strategy still holds the sharded model
    (Lightning tears the strategy down before `fit` returns). Every rank writes its own shards."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


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
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        state = ckpt["state_dict"]
        return ckpt["hyper_parameters"], _model_tensors({k: (lambda k=k: state[k]) for k in state})
    if kind == "dcp":
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        return meta["hyper_parameters"], _dcp_tensors(path)
    return _deepspeed_checkpoint(path)


def _model_tensors(loaders: dict[str, Callable[[], torch.Tensor]]) -> Iterator[tuple[str, Callable]]:
    """Keep the HF model's entries, named as HF names them; refuse what a plain HF dir cannot hold."""
    for key, load in loaders.items():
        if not key.startswith(MODEL_PREFIX):
            continue  # module buffers such as tokens_seen
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
    """The exact HF config: the pretrained weights' own, or the spec's architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fulltune.models import architecture_config, resolve_weights

    config = architecture_config(spec) if spec.source == "config" else AutoConfig.from_pretrained(
        resolve_weights(spec))
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    return config


def tied_copies(config: Any) -> set[str]:
    """Weights that are views of others when the config ties them (lm_head = embeddings): like
    `save_pretrained`, the export leaves them out and `from_pretrained` ties them again."""
    from transformers import AutoModelForCausalLM

    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return set(AutoModelForCausalLM._model_mapping[type(config)]._tied_weights_keys or ())


def write_hf_dir(
    tensors: Iterator[tuple[str, Callable[[], torch.Tensor]]], config: Any, tokenizer: Any, out_dir: str | Path,
    shard_bytes: int = SHARD_BYTES, eos_token_ids: list[int] | None = None,
) -> Path:
    """Write safetensors shards (HF names: `model-00001-of-00003.safetensors` + index, or one
    `model.safetensors`), loading tensors one at a time and holding one shard at most."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

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

    dtype, skip = None, tied_copies(config)
    for name, load in tensors:
        if name in skip:
            continue
        tensor = load().detach().to("cpu").clone(memory_format=torch.contiguous_format)  # own, unshared memory
        dtype = dtype or tensor.dtype
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
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = eos_token_ids or tokenizer.eos_token_id  # as in export_hf
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
    from fulltune.models import load_tokenizer

    hyper_parameters, tensors = read_checkpoint(checkpoint)
    spec = hyper_parameters["model"]
    return write_hf_dir(
        tensors, hf_config(spec), tokenizer or load_tokenizer(spec), out_dir, shard_bytes, eos_token_ids
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fulltune.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file, an FSDP DCP dir or a DeepSpeed dir")
    parser.add_argument("--out", type=Path, help="output dir (default: <checkpoint>-hf beside it)")
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1024**3, help="max size of one file")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_name(args.checkpoint.name.removesuffix(".ckpt") + "-hf")
    try:
        print(export_checkpoint(args.checkpoint, out, shard_bytes=int(args.shard_gb * 1024**3)))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
