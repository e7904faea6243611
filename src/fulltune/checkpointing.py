"""Checkpoints that are never half-written, a disk check before each, and a last one on preemption.

`ResumableCheckpoint` is Lightning's ModelCheckpoint (every `save_steps`, `save_total_limit`, the
`last.ckpt` link) with three changes:

- every rank writes into a hidden staging name (`.step000004.ckpt.partial`, a file or a sharded DCP /
  DeepSpeed directory); once all ranks are done, rank 0 renames it into place and records it in
  `checkpoints/latest.json`. A crash at any point leaves at most a hidden leftover: `resume=auto`
  reads `latest.json`, which only ever names a complete checkpoint. Pruning to `save_total_limit`
  happens after that (Lightning's order), and renames before it deletes;
- before each save, the free disk is checked against the size of the last checkpoint (or an upper
  bound from the parameter count before the first): a save that would not fit stops the run with
  the sizes, keeping the checkpoints written so far;
- SIGTERM and SIGUSR1 (SLURM's warning before the time limit) are noted, the step in progress
  finishes, a checkpoint is saved and the run exits (`Preempted`); under submitit its own handler
  for the signal then requeues the job, under plain SLURM `scontrol requeue` does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fulltune.atomic import remove_path, replace_path, write_text
from fulltune.preflight import ConfigError

log = logging.getLogger(__name__)
LATEST = "latest.json"  # in the checkpoints dir: {"checkpoint": name, "global_step": N}, written last
GB = 1024**3


class Preempted(SystemExit):
    """The run saved a checkpoint after a preemption signal and stops; its exit status is 128 + signal."""


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run's `checkpoints/` dir, or None when it has none."""
    record = checkpoint_dir / LATEST
    if not record.is_file():
        return None
    path = checkpoint_dir / json.loads(record.read_text())["checkpoint"]
    return path if path.exists() else None


def path_bytes(path: Path) -> int:
    """Bytes of a checkpoint file or directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimated_checkpoint_bytes(module: L.LightningModule) -> int:
    """An upper bound before the first save: the weights in their dtype plus, per trainable parameter,
    fp32 master and two Adam moments (12 bytes). Counts whole tensors (sharded or ZeRO-3-partitioned)."""
    total = 0
    for p in module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel * p.element_size() + (numel * 12 if p.requires_grad else 0)
    return total


class ResumableCheckpoint(ModelCheckpoint):
    """See the module docstring. `free_disk_margin_gb`: disk to leave free beyond each checkpoint."""

    def __init__(self, free_disk_margin_gb: float = 1.0,
                 preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.free_disk_margin_gb = free_disk_margin_gb
        self.preempt_signals = [signal.Signals[name] for name in preempt_signals]
        self._received: signal.Signals | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._step_at_batch_start = -1

    # -- writing -----------------------------------------------------------------------------------

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        staging = target.with_name(f".{target.name}.partial")
        self._check_free_disk(trainer, target.parent)
        if trainer.is_global_zero:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_path(staging)  # a leftover of a crashed save
            for logger in trainer.loggers:  # every logged row up to this step is on disk with it
                logger.save()
        trainer.strategy.barrier("ResumableCheckpoint.stage")
        super()._save_checkpoint(trainer, str(staging))  # every rank writes its part; ends in a barrier
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            replace_path(staging, target)
            write_text(target.parent / LATEST, json.dumps({"checkpoint": target.name,
                                                           "global_step": trainer.global_step}))
        trainer.strategy.barrier("ResumableCheckpoint.publish")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            remove_path(Path(filepath))
        trainer.strategy.barrier("ResumableCheckpoint.remove")

    def _check_free_disk(self, trainer: L.Trainer, directory: Path) -> None:
        """Stop before a save that would not fit; every rank decides together (each may see its own disk)."""
        previous = Path(self._last_checkpoint_saved) if self._last_checkpoint_saved else None
        if previous is not None and previous.exists():
            need = path_bytes(previous.resolve())
        else:
            need = estimated_checkpoint_bytes(trainer.lightning_module)
        existing = directory if directory.exists() else next(p for p in directory.parents if p.exists())
        free = shutil.disk_usage(existing).free
        margin = int(self.free_disk_margin_gb * GB)
        fits = trainer.strategy.reduce_boolean_decision(free >= need + margin, all=True)
        if not fits:
            kept = latest_checkpoint(directory)
            raise ConfigError(
                f"{directory}: not enough free disk for the step-{trainer.global_step} checkpoint: it needs "
                f"~{need / GB:.2f} GB plus save_free_disk_gb={self.free_disk_margin_gb:g} GB kept free, and "
                f"{free / GB:.2f} GB are free. The run stopped; its last complete checkpoint is "
                f"{kept or 'none (none was saved yet)'}. Free disk space (or lower save_total_limit, or point "
                f"paths.log_dir at a larger disk), then rerun with resume=auto to continue from it."
            )

    # -- preemption --------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replace the handlers Lightning just installed (its SIGTERM handler stops after any
        micro-batch, mid-accumulation, without saving); Lightning restores the originals at teardown."""
        for signum in self.preempt_signals:
            previous = signal.getsignal(signum)
            self._previous_handlers[signum] = getattr(previous, "signal_handlers", [previous])
            signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, frame: Any) -> None:
        log.warning("received %s: finishing the current step, then saving a checkpoint", signal.Signals(signum).name)
        self._received = signal.Signals(signum)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step_at_batch_start:  # mid-accumulation: the step is not done
            return
        code = int(self._received or 0)
        if trainer.world_size > 1:  # any rank's signal stops every rank at this same step
            code = int(trainer.strategy.reduce(torch.tensor(code, device=trainer.strategy.root_device),
                                               reduce_op="max"))
        if code:
            self._save_and_exit(trainer, signal.Signals(code))

    def _save_and_exit(self, trainer: L.Trainer, signum: signal.Signals) -> None:
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        saved = latest_checkpoint(Path(self.dirpath))
        trainer._logger_connector.update_train_step_metrics()  # what Lightning logs right after this hook
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            log.warning("%s: saved %s at step %d; rerun the same command with resume=auto to continue",
                        signum.name, saved, trainer.global_step)
            requeue(signum, self._previous_handlers.get(signum, []))
        raise Preempted(128 + signum)


def requeue(signum: signal.Signals, previous_handlers: list[Any]) -> None:
    """Hand the signal to whoever asked to requeue on it: submitit's handler (it pickles the job,
    runs `scontrol requeue` and exits), else under SLURM `scontrol requeue` for SIGUSR1 (what
    Lightning's SLURMEnvironment(auto_requeue=True) does)."""
    handlers = [h for h in previous_handlers if callable(h) and "submitit" in getattr(h, "__module__", "")]
    for handler in handlers:
        handler(signum, None)
    job = os.environ.get("SLURM_JOB_ID")
    if not handlers and job and signum == signal.SIGUSR1:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
        subprocess.run(["scontrol", "requeue", job], check=False)
