"""Forgetting: what fine-tuning costs the model on what it could do before.

For each original-task set (held-out general text by default):

    forgetting/<set> = Perf_pre − Perf_now,  with Perf = −(mean next-token loss on the set, nats)
                     = loss_now − loss_pre

so **forgetting > 0 means the model got worse** on the set (0: unchanged; < 0: it got better, e.g.
when replay trains on the same distribution). exp(loss) is the set's perplexity.

Perf_pre is measured once on the untouched model, before the first step, and cached on disk keyed
by the model config, the precision and the exact tokens of the set: a second run (another LR, another
method: LoRA and freeze start from the same function) reuses it. Perf_now is measured at every
validation (logged as `forgetting/<set>` and `forgetting/<set>_loss`) and at the end (summary.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from fulltune.atomic import write_text
from fulltune.evaluate import mean_token_loss, validated_loss
from fulltune.preflight import ConfigError

SPREAD = 64  # the builtin set's order: every 64th paragraph, then the next...: any prefix spans all topics


def python_docs_file(directory: Path, rows: int | None = None) -> Path:
    """Natural English that nothing in fulltune trains on, available offline: the prose paragraphs of
    Python's reference manual, from the stdlib's `pydoc_data` (PSF license), written once as a jsonl
    text file; all of them in an order that spreads every prefix over all topics, or `rows` of them."""
    import pydoc_data.topics

    path = directory / f"python_docs-{rows or 'all'}.jsonl"
    if path.exists():
        return path
    paragraphs = []
    for _, topic in sorted(pydoc_data.topics.topics.items()):
        for block in re.split(r"\n\s*\n", topic):
            text = " ".join(line.strip() for line in block.strip().splitlines())
            # prose only: not indented (code, grammar), long enough, no grammar rules or prompts
            if not block.startswith((" ", "\t")) and len(text) >= 200 and text[0].isalpha() and (
                    "::=" not in text and ">>>" not in text):
                paragraphs.append(text)
    if rows is None:
        picked = [p for k in range(SPREAD) for p in paragraphs[k::SPREAD]]
    elif len(paragraphs) < rows:
        raise ConfigError(f"builtin set python_docs: rows={rows}, but this Python has {len(paragraphs)} paragraphs")
    else:
        picked = paragraphs[:: len(paragraphs) // rows][:rows]
    write_text(path, "".join(json.dumps({"text": text}) + "\n" for text in picked))
    return path


def heldout_loader(datamodule: Any, spec: Mapping) -> Iterable:
    """Batches of original-task data named by `spec`:

    - `{source: NAME}`: the data module's validation loader of that source group (e.g. `replay`);
    - `{path: FILE, format: text, ...}` (any data-source keys): the file, tokenized, cached, chunked
      like replay text and batched like the validation data; `take_tokens: N` measures its first N tokens;
    - `{builtin: python_docs, take_tokens: N}` (or `rows: N` paragraphs): Python's reference manual,
      general English that no fulltune data trains on.
    """
    if "builtin" in spec:
        if spec["builtin"] != "python_docs":
            raise ConfigError(f"original-task data {dict(spec)}: the only builtin set is python_docs")
        directory = Path(datamodule.cache_dir) / "forgetting_sets"
        path = python_docs_file(directory, spec.get("rows"))
        spec = {"name": "python_docs", "path": str(path), "format": "text",
                **{k: v for k, v in spec.items() if k not in ("builtin", "rows")}}
    if "source" in spec:
        names = list(datamodule.val_source_names)
        if spec["source"] not in names:
            raise ConfigError(
                f"original-task data {dict(spec)}: the data module has no {spec['source']!r} validation "
                f"data (it has {names}); add a data.{spec['source']} source with val_path, or give a file "
                "as {path: FILE, format: text}"
            )
        return datamodule.val_dataloader()[names.index(spec["source"])]
    if "path" not in spec:
        raise ConfigError(f"original-task data {dict(spec)}: give either `source` or `path` (+ `format`)")
    return datamodule.heldout_loader(dict(spec), f"eval.forgetting.sets: {dict(spec)}")


def describe_set(spec: Mapping) -> str:
    """What a set measures, for the printed summary: held-out text, or in-distribution loss."""
    if "builtin" in spec:
        return "held-out general text (Python's reference manual), never trained on"
    if spec.get("source") == "replay":
        return "the replay validation split: in-distribution replay loss (replay trains towards it)"
    if "source" in spec:
        return f"the {spec['source']} validation split"
    return f"held-out file {spec['path']}"


LOSS_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask")


def cache_key(spec: DictConfig, precision: str, loader: Iterable) -> str:
    """Identity of a pretrained measurement: model config (less where it is cached and how it is
    trained), precision, and a hash of the tensors of every batch of the set that decide its loss
    (not the batch's bookkeeping, such as its token counts)."""
    model = OmegaConf.to_container(spec, resolve=True)
    for key in ("cache_dir", "gradient_checkpointing"):
        model.pop(key, None)
    digest = hashlib.sha256(json.dumps({"model": model, "precision": precision}, sort_keys=True).encode())
    for batch in loader:
        for key in sorted(batch):
            if key in LOSS_INPUTS:
                digest.update(key.encode())
                digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


class ForgettingEvaluation(L.Callback):
    """Measures forgetting on original-task `sets` ({name: spec for `heldout_loader`}; a null spec
    drops the set) before training (cached in `cache_dir`), at every validation and at the end;
    `results` go to summary.json. A `source` set the data module lacks is skipped with a warning, so
    the default config runs on data without replay."""

    def __init__(self, sets: Mapping[str, Mapping], cache_dir: str | None = None) -> None:
        self.sets = {name: dict(spec) for name, spec in (sets or {}).items() if spec is not None}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.before: dict[str, float] = {}
        self.results: dict[str, float] = {}
        self.loaders: dict[str, Iterable] = {}
        self.last: tuple[int, dict[str, float]] | None = None  # (global step, measure) of the last validation

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        for name, spec in self.sets.items():
            if "source" in spec and spec["source"] not in datamodule.val_source_names:
                rank_zero_warn(f"forgetting set {name!r} skipped: the data has no {spec['source']!r} validation data")
                continue
            self.loaders[name] = heldout_loader(datamodule, spec)
            if name not in self.before:  # a resumed run keeps its first measurement
                self.before[name] = self.pretrained_loss(trainer, module, name)

    def pretrained_loss(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> float:
        """The untouched model's loss on a set: from the cache when this model measured this exact
        set before, else measured now (and cached). Rank 0 decides, so all ranks evaluate or none."""
        loader = self.loaders[name]
        path = None
        if self.cache_dir is not None:
            key = cache_key(module.spec, str(trainer.precision), loader)
            path = self.cache_dir / f"{module.spec.name}-{name}-{key}.json"
        cached = json.loads(path.read_text())["loss"] if trainer.is_global_zero and path and path.exists() else None
        cached = trainer.strategy.broadcast(cached)
        what = f"forgetting/{name}, {describe_set(self.sets[name])}: pretrained loss"
        if cached is not None:
            rank_zero_info(f"{what} {cached:.4f} (reused from {path})")
            return float(cached)
        loss = mean_token_loss(module, loader)
        rank_zero_info(f"{what} {loss:.4f}")
        if trainer.is_global_zero and path is not None:
            record = {"model": module.spec.name, "set": name, "spec": self.sets[name], "loss": loss}
            write_text(path, json.dumps(record))
        return loss

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        """Current loss and forgetting (loss_now − loss_pre) on every set; a `source` set's loss is the
        validation's when it just measured the same batches (`validated_loss`)."""
        out = {}
        for name, loader in self.loaders.items():
            source = self.sets[name].get("source")
            loss = validated_loss(trainer, module, source) if source else None
            loss = mean_token_loss(module, loader) if loss is None else loss
            out[f"forgetting/{name}"] = loss - self.before[name]
            out[f"forgetting/{name}_loss"] = loss
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.loaders:
            return
        if hasattr(module, "validation_losses"):  # reduced now (the module logs them after the callbacks),
            module.validation_losses()             # so a `source` set reuses this validation's loss
        self.last = (trainer.global_step, self.measure(trainer, module))
        for key, value in self.last[1].items():
            module.log(key, value)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.loaders:
            return
        validated_now = self.last is not None and self.last[0] == trainer.global_step  # same weights
        now = self.last[1] if validated_now else self.measure(trainer, module)
        for name in self.loaders:
            before, after = self.before[name], now[f"forgetting/{name}_loss"]
            self.results.update({
                f"forgetting/{name}": after - before,
                f"forgetting/{name}_loss_before": before,
                f"forgetting/{name}_loss_after": after,
                f"forgetting/{name}_ppl_before": math.exp(before),
                f"forgetting/{name}_ppl_after": math.exp(after),
            })
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = dict(state_dict["before"])
