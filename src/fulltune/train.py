"""Hydra main: preflight -> data -> module -> trainer.fit -> HF export -> summary.json."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fulltune.preflight import CONF_DIR, ConfigError, check_override_keys, preflight

log = logging.getLogger(__name__)
JOB_CONFIG_ENV = "FULLTUNE_JOB_CONFIG"
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


def reset_peak_memory() -> None:
    """Open this run's peak-memory window: the jobs of a multirun share one process, and without a
    reset each would report the largest peak of all jobs before it. On CPU the earlier jobs' freed
    memory is first handed back to the OS, so it does not count as this run's."""
    import contextlib
    import ctypes
    import gc

    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc only
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS


def peak_memory_bytes() -> int:
    """Peak device memory on GPU, else the process's peak RSS since `reset_peak_memory`."""
    import re
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def optimizer_step_intervals(trainer: DictConfig) -> dict:
    """`trainer.val_check_interval: N` counts optimizer steps, like `save_steps` and
    `log_every_n_steps`; Lightning counts micro-batches, within one epoch unless
    `check_val_every_n_epoch` is None. A fraction of an epoch is passed through."""
    interval = trainer.val_check_interval
    if not isinstance(interval, int) or isinstance(interval, bool):
        return {}
    return {"val_check_interval": interval * trainer.accumulate_grad_batches, "check_val_every_n_epoch": None}


@contextmanager
def job_scope(job_config: Path) -> Iterator[None]:
    """Run one job's `trainer.fit` self-contained, also as one job of a Hydra multirun.

    Lightning starts ranks > 0 by re-running the command line: in a multirun each child would run the
    whole sweep (pytorch-lightning #11300) and resolve `${now:}` on its own (#5512). Instead the
    children find this job's resolved config through FULLTUNE_JOB_CONFIG (see `main`), so every rank
    runs exactly this job in its output dir. Afterwards the process group and the launcher's
    variables (LOCAL_RANK, WORLD_SIZE, MASTER_PORT...) are cleared: left set, the next job would take
    its processes for externally started ones and wait for ranks that never come.
    """
    import torch

    saved = dict(os.environ)
    os.environ[JOB_CONFIG_ENV] = str(job_config)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def fit(cfg: DictConfig, plan_bytes: int | None = None) -> dict:
    """Train one run and return its summary (also written to `<output_dir>/summary.json`);
    `plan_bytes`, the memory plan's per-device total, is recorded beside the measured peak."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from fulltune.export import ExportAtTrainEnd
    from fulltune.finetune import count_params, merged_for_export
    from fulltune.launch import resolve_hardware
    from fulltune.loggers import finish_loggers
    from fulltune.models import load_tokenizer
    from fulltune.module import CausalLMModule
    from fulltune.optim import optimizer_for_precision
    from fulltune.regularizers import RegularizerSetup
    from fulltune.strategies import optimizer_for

    resolve_hardware(cfg)  # a no-op after `train`; `fit` is also called on its own (tests, sweeps)
    for name in ("lightning.pytorch", "lightning.fabric"):  # Hydra's root handlers print them once
        logging.getLogger(name).handlers.clear()
    L.seed_everything(cfg.seed, workers=True)
    if cfg.precision.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(cfg.paths.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    regularizer = instantiate(cfg.regularizer) if "_target_" in cfg.regularizer else None
    strategy = instantiate(cfg.strategy)
    spec = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))  # checkpoints keep no ${hydra:...}
    module = CausalLMModule(
        model=spec,
        optimizer=optimizer_for(strategy, optimizer_for_precision(cfg.optimizer, cfg.precision.value, strategy)),
        scheduler=instantiate(cfg.scheduler), finetune=cfg.finetune, regularizer=regularizer,
    )
    evaluators = [instantiate(e) for e in cfg.eval.values() if e is not None]  # each has `results`
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + evaluators
    callbacks += [RegularizerSetup(regularizer)] if regularizer is not None else []
    # the HF export, weights only, from the live (maybe sharded) model at the end of training; generation
    # stops where training ended completions. LoRA merges in place, so after `fit` counted its adapters.
    exporter = ExportAtTrainEnd(out_dir / "hf", tokenizer, cfg.export_dtype, datamodule.stop_token_ids)
    lora = cfg.finetune.method == "lora"  # never sharded (check_strategy): its weights stay whole on rank 0
    if cfg.export and not lora:
        callbacks.append(exporter)
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(
        cfg.trainer, **optimizer_step_intervals(cfg.trainer), strategy=strategy, precision=cfg.precision.value,
        callbacks=callbacks, logger=loggers or False,
    )
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml({**resolved, "run": run_metadata()}))
        for logger in trainer.loggers:  # the whole resolved config, not only the module's hyper-parameters
            logger.log_hyperparams(resolved)

    reset_peak_memory()
    start = time.time()
    with job_scope(out_dir / "config.yaml"):
        # our own checkpoints: their hyper-parameters hold DictConfigs, which weights_only=True refuses
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=False)
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
        "memory_plan_bytes": plan_bytes,
        **metrics,
        **{k: v for evaluator in evaluators for k, v in evaluator.results.items()},
        "data": getattr(datamodule, "stats", {}),
    }
    summary["tokens_per_s"] = round(summary["tokens_seen"] / summary["wall_time_s"], 1)
    if trainer.is_global_zero:
        if cfg.export:
            if lora:
                exporter.export(trainer, merged_for_export(module.model))
            summary["export_dir"] = str(exporter.out_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("summary: %s", out_dir / "summary.json")
        finish_loggers(trainer.loggers, summary)
    return summary


def train(cfg: DictConfig) -> float | None:
    """One run from a composed config; returns `cfg.optimized_metric` for sweepers."""
    from fulltune.launch import check_memory, dry_run, resolve_hardware
    from fulltune.strategies import check_strategy

    resolve_hardware(cfg)
    preflight(cfg)
    check_strategy(cfg)
    if cfg.dry_run:
        dry_run(cfg)
        return None
    plan = check_memory(cfg)
    summary = fit(cfg, None if plan is None else plan.total)
    value = summary.get(cfg.optimized_metric)
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return train(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep records the failed job and goes on
            raise
        sys.exit(f"error: {err}")


def main() -> None:
    """Console entry: unknown keys get a did-you-mean message before Hydra composes anything.

    A rank > 0 that Lightning started for a job runs that job's resolved config instead of the
    command line (in a multirun, the whole sweep): see `job_scope`.
    """
    job_config = os.environ.get(JOB_CONFIG_ENV)
    if job_config and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        cfg = OmegaConf.load(job_config)
        cfg.pop("run")  # the run metadata stored beside the config
        train(cfg)
        return
    overrides = [a for a in sys.argv[1:] if not a.startswith("-") and "=" in a]
    try:
        check_override_keys(overrides)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    _hydra_main()
