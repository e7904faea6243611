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
from importlib.metadata import distributions
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fulltune.errors import exit_on_user_error
from fulltune.preflight import CONF_DIR, check_command_line, preflight

if TYPE_CHECKING:
    from fulltune.data import FineTuneDataModule

log = logging.getLogger(__name__)
JOB_CONFIG_ENV = "FULLTUNE_JOB_CONFIG"


def run_metadata() -> dict:
    """Git SHA (with a dirty flag) of a clone's code (none for an installed wheel: its version is in
    `versions`) and the version of every installed package, stored beside the resolved config."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=CONF_DIR.parent, capture_output=True, text=True)
        return out.stdout.strip()

    clone = (CONF_DIR.parent / ".git").exists()  # not a user's repository that a venv happens to sit in
    return {
        "git_sha": (git("rev-parse", "HEAD") or None) if clone else None,
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if clone else None,
        "versions": dict(sorted((d.metadata["Name"], d.version) for d in distributions() if d.metadata["Name"])),
        "python": sys.version.split()[0],
    }


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
    from fulltune.strategies import destroy_process_group

    saved = dict(os.environ)
    os.environ[JOB_CONFIG_ENV] = str(job_config)
    try:
        yield
    finally:
        destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def detached(node: DictConfig) -> DictConfig:
    """A resolved copy of a config node on its own, as checkpoints store the module's hyper-parameters:
    a node of the run's config would take the whole config (its parents, their resolver caches) into
    every checkpoint, and `torch.load(weights_only=True)` cannot rebuild those caches. Secrets are
    redacted (`fulltune.redact`): nothing reads a token from the model or finetune settings."""
    from fulltune.redact import redacted

    return OmegaConf.create(redacted(OmegaConf.to_container(node, resolve=True)))


def check_inputs(datamodule: FineTuneDataModule, evaluators: list) -> None:
    """Fail fast, before the trainer, any output or any weights: every row read and checked (and
    tokenized, once, into the cache that Lightning's own `prepare_data` then finds), then what each
    evaluation needs of the data. One process per node does it, as in Lightning; the others wait
    for it inside `trainer.fit`."""
    from fulltune.evaluate import BeforeAfterEvaluation

    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return
    datamodule.prepare_data()
    datamodule.setup("fit")
    for evaluator in evaluators:
        if isinstance(evaluator, BeforeAfterEvaluation):
            evaluator.check_data(datamodule)


def fit(cfg: DictConfig, plan_bytes: int | None = None, arch: Any = None) -> dict:
    """Train one run and return its summary (also written to `<output_dir>/summary.json`);
    `plan_bytes`, the memory plan's per-device total, is recorded beside the measured peak; `arch`
    is the model's `memory.Arch` when the caller already described it (else it is built here)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from fulltune.console import closing_table, header, quiet_libraries
    from fulltune.export import ExportAtTrainEnd
    from fulltune.finetune import count_params, merged_for_export
    from fulltune.launch import plan_settings, resolve_hardware
    from fulltune.loggers import finish_loggers
    from fulltune.models import load_tokenizer, resolve_architecture
    from fulltune.module import CausalLMModule
    from fulltune.optim import optimizer_for_precision
    from fulltune.redact import redacted
    from fulltune.regularizers import RegularizerSetup
    from fulltune.resume import resolve_resume
    from fulltune.safe_load import checkpoint_classes_allowed
    from fulltune.strategies import optimizer_for
    from fulltune.telemetry import Telemetry, reset_peak_memory

    started = time.perf_counter()
    resolve_hardware(cfg)  # a no-op after `train`; `fit` is also called on its own (tests, sweeps)
    resolve_resume(cfg)  # resume=auto -> a checkpoint, and the interrupted run's dir as the output dir
    resolve_architecture(cfg.model)  # a no-op after `train`
    quiet_libraries(cfg.get("debug", False))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.precision.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(cfg.paths.output_dir)
    arch = arch or plan_settings(cfg)[0]  # the model's shapes (meta device): the header, FLOPs per token
    telemetry = Telemetry(started, arch)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
    regularizer = instantiate(cfg.regularizer) if "_target_" in cfg.regularizer else None
    strategy = instantiate(cfg.strategy)
    spec = detached(cfg.model)
    module = CausalLMModule(
        model=spec,
        optimizer=optimizer_for(strategy, optimizer_for_precision(cfg.optimizer, cfg.precision.value, strategy)),
        scheduler=instantiate(cfg.scheduler), finetune=detached(cfg.finetune), regularizer=regularizer,
    )
    evaluators = [instantiate(e) for e in cfg.eval.values() if e is not None]  # each has `results`
    check_inputs(datamodule, evaluators)
    # telemetry first: its hooks mark where the evaluators' and the export's time begins
    callbacks = [telemetry] + [instantiate(c) for c in cfg.callbacks.values() if c is not None] + evaluators
    callbacks += [RegularizerSetup(regularizer)] if regularizer is not None else []
    # the HF export, weights only, from the live (maybe sharded) model at the end of training; generation
    # stops where training ended completions. LoRA merges in place, so after `fit` counted its adapters.
    exporter = ExportAtTrainEnd(out_dir / "hf", tokenizer, cfg.export_dtype, datamodule.stop_token_ids)
    lora = cfg.finetune.method in ("lora", "qlora")  # never sharded (check_strategy): its weights stay whole on rank 0
    if cfg.export and not lora:
        callbacks.append(exporter)
    loggers = [instantiate(lg) for lg in (cfg.logger or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(
        cfg.trainer, **optimizer_step_intervals(cfg.trainer), strategy=strategy, precision=cfg.precision.value,
        callbacks=callbacks, logger=loggers or False, profiler=telemetry.clock,
    )
    if trainer.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = redacted(OmegaConf.to_container(cfg, resolve=True))  # as written and logged: no secrets
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml({**resolved, "run": run_metadata()}))
        for logger in trainer.loggers:  # the whole resolved config, not only the module's hyper-parameters
            logger.log_hyperparams(resolved)
        log.info(header(cfg, arch.total, arch.trainable, plan_bytes))

    reset_peak_memory()
    with job_scope(out_dir / "config.yaml"), checkpoint_classes_allowed():  # a resumed checkpoint runs no code
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.resume, weights_only=True)
    total, trainable = count_params(module.model)  # before a LoRA export merges the adapters away
    if trainer.is_global_zero and cfg.export and lora:
        exporter.export(trainer, merged_for_export(module.model))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    performance = telemetry.results(trainer.world_size, trainer.global_step, exporter.seconds)
    summary = {
        "run_name": cfg.run_name,
        "model": cfg.model.name,
        "finetune": cfg.finetune.method,
        "strategy": cfg.strategy.name,
        "precision": cfg.precision.value,
        "global_step": trainer.global_step,
        "wall_time_s": performance["time_s"]["wall"],
        "params_total": total,
        "params_trainable": trainable,
        "memory_plan_bytes": plan_bytes,
        **performance,
        **metrics,
        **{k: v for evaluator in evaluators for k, v in evaluator.results.items()},
        "data": getattr(datamodule, "stats", {}),
        "output_dir": str(out_dir),
    }
    if trainer.is_global_zero:
        if cfg.export:
            summary["export_dir"] = str(exporter.out_dir)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("%s\nsummary: %s", closing_table(summary), out_dir / "summary.json")
        finish_loggers(trainer.loggers, summary)
    return summary


def train(cfg: DictConfig) -> float | None:
    """One run from a composed config; returns `cfg.optimized_metric` for sweepers."""
    from fulltune.launch import check_memory, dry_run, plan_settings, resolve_hardware, return_freed_memory
    from fulltune.models import resolve_architecture
    from fulltune.quiet import quiet_loggers

    quiet_loggers(not cfg.get("debug", False))  # before the libraries load (debug: their lines too)
    resolve_hardware(cfg)
    preflight(cfg)
    resolve_architecture(cfg.model, download=not cfg.dry_run)  # the weights' config.json, once, for every step
    if cfg.dry_run:
        dry_run(cfg)
        return None
    return_freed_memory(cfg.trainer)  # before anything big is allocated
    planned = plan_settings(cfg)  # the meta-device model, built once for the gate and the run
    plan = check_memory(cfg, planned)
    summary = fit(cfg, None if plan is None else plan.total, arch=planned[0])
    value = summary.get(cfg.optimized_metric)
    return None if value is None else float(value)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep records the failed job and goes on
        return train(cfg)
    with exit_on_user_error(debug=cfg.get("debug", False)):
        return train(cfg)


def split_config_dir(args: list[str]) -> tuple[list[str], str | None]:
    """The command line less a user's own config dir (`--config-dir DIR`, `-cd DIR`,
    `--config-dir=DIR`: Hydra searches it beside the shipped tree), and that dir."""
    for k, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and k + 1 < len(args):
            return args[:k] + args[k + 2:], args[k + 1]
        if arg.startswith("--config-dir="):
            return args[:k] + args[k + 1:], arg.partition("=")[2]
    return args, None


def main() -> None:
    """Console entry: unknown keys and group options get a did-you-mean message before Hydra composes
    anything; any user error ends the run as its message alone with exit code 2 (`fulltune.errors`).

    A rank > 0 that Lightning started for a job runs that job's resolved config instead of the
    command line (in a multirun, the whole sweep): see `job_scope`.
    """
    job_config = os.environ.get(JOB_CONFIG_ENV)
    if job_config and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        cfg = OmegaConf.load(job_config)
        cfg.pop("run")  # the run metadata stored beside the config
        with exit_on_user_error(debug=cfg.get("debug", False)):
            train(cfg)
        return
    args, config_dir = split_config_dir(sys.argv[1:])
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    if set(flags) <= {"-m", "--multirun"}:  # --help, --cfg ...: Hydra answers without a run dir
        with exit_on_user_error():
            check_command_line(overrides, multirun=bool(flags), config_dir=config_dir)
    _hydra_main()
