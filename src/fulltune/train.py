"""Hydra main: preflight -> data -> module -> trainer.fit -> HF export -> summary.json."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fulltune.preflight import CONF_DIR, ConfigError, check_override_keys, preflight

log = logging.getLogger(__name__)
PACKAGES = ("torch", "lightning", "transformers", "hydra-core", "datasets", "peft", "wandb")


def run_metadata() -> dict:
    """Git SHA (with a dirty flag) and package versions, stored beside the resolved config."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=CONF_DIR.parent, capture_output=True, text=True)
        return out.stdout.strip()

    return {
        "git_sha": git("rev-parse", "HEAD") or None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": {name: version(name) for name in PACKAGES},
        "python": sys.version.split()[0],
    }


def peak_memory_bytes() -> int:
    """Peak device memory on GPU, else the process's peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dry_run(cfg: DictConfig) -> None:
    """Build the architecture on the meta device and report its size; no weights, no data."""
    from fulltune.finetune import apply_finetune, count_params
    from fulltune.models import build_model

    model = apply_finetune(build_model(cfg.model, device="meta"), cfg.finetune)
    total, trainable = count_params(model)
    print(f"model={cfg.model.name}: {total:,} parameters, {trainable:,} trainable ({trainable / total:.2%})")


def fit(cfg: DictConfig) -> dict:
    """Train one run and return its summary (also written to `<output_dir>/summary.json`)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from fulltune.evaluate import TaskEvaluation
    from fulltune.export import export_hf
    from fulltune.finetune import count_params
    from fulltune.models import load_tokenizer
    from fulltune.module import CausalLMModule

    L.seed_everything(cfg.seed, workers=True)
    if cfg.precision.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(cfg.paths.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    module = CausalLMModule(
        model=cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
        finetune=cfg.finetune,
    )
    task_eval: TaskEvaluation = instantiate(cfg.eval)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [task_eval]
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(
        cfg.trainer, strategy=instantiate(cfg.strategy), precision=cfg.precision.value,
        callbacks=callbacks, logger=loggers or False,
    )
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml({**resolved, "run": run_metadata()}))

    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume)
    total, trainable = count_params(module.model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    summary = {
        "run_name": cfg.run_name,
        "model": cfg.model.name,
        "finetune": cfg.finetune.method,
        "strategy": cfg.strategy.name,
        "precision": cfg.precision.value,
        "global_step": trainer.global_step,
        "wall_time_s": round(time.time() - start, 2),
        "tokens_seen": int(module.tokens_seen) * trainer.world_size,
        "params_total": total,
        "params_trainable": trainable,
        "peak_memory_bytes": peak_memory_bytes(),
        **metrics,
        **task_eval.results,
        "data": getattr(datamodule, "stats", {}),
    }
    summary["tokens_per_s"] = round(summary["tokens_seen"] / summary["wall_time_s"], 1)
    if trainer.is_global_zero:
        if cfg.export:
            summary["export_dir"] = str(export_hf(module.model, tokenizer, out_dir / "hf"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("summary: %s", out_dir / "summary.json")
    return summary


def train(cfg: DictConfig) -> float | None:
    """One run from a composed config; returns `cfg.optimized_metric` for sweepers."""
    preflight(cfg)
    if cfg.dry_run:
        dry_run(cfg)
        return None
    summary = fit(cfg)
    value = summary.get(cfg.optimized_metric)
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> None:
    """Console entry: unknown keys get a did-you-mean message before Hydra composes anything."""
    overrides = [a for a in sys.argv[1:] if not a.startswith("-") and "=" in a]
    try:
        check_override_keys(overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    _hydra_main()
