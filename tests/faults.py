"""Faults injected into real runs (added to a command as `+callbacks.x._target_=tests.faults...` or
`+logger.x...`): a hold at a chosen micro-batch so a test can signal or SIGKILL the process there, a
SIGKILL of the whole process group before or after the write of a checkpoint, and NaN activations on
chosen steps; a disk that fills up. Each kill and hold fires once per run dir (a marker file), so the
resumed segment runs clean."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers.logger import Logger


def fire_once(out_dir: str | Path, name: str) -> bool:
    """True the first time `name` is asked for in this run dir."""
    marker = Path(out_dir) / f"fault-{name}"
    if marker.exists():
        return False
    marker.touch()
    return True


class HoldAtStep(L.Callback):
    """Before micro-batch `micro` of optimizer step `step` (1-based), every rank waits until the test
    writes `release` (or kills it); rank 0 first writes its pid to `fault-held`."""

    def __init__(self, step: int, micro: int = 0) -> None:
        self.step, self.micro = step, micro

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        at = trainer.global_step + 1 == self.step and batch_idx % trainer.accumulate_grad_batches == self.micro
        if not at or (Path(trainer.default_root_dir) / "release").exists():
            return
        if trainer.is_global_zero:
            (Path(trainer.default_root_dir) / "fault-held").write_text(str(os.getpid()))
        while not (Path(trainer.default_root_dir) / "release").exists():
            time.sleep(0.05)


class KillBeforePublish(Logger):
    """SIGKILL the whole process group once every rank has written its part of the step-`step` checkpoint
    (Lightning tells loggers right after the write), before it is published under its name."""

    name = "kill_before_publish"
    version = "0"

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        out_dir = Path(checkpoint_callback.dirpath).parent
        if checkpoint_callback._last_global_step_saved == self.step and fire_once(out_dir, f"killed-step{self.step}"):
            os.killpg(os.getpgid(0), signal.SIGKILL)


class KillBeforeWrite(L.Callback):
    """SIGKILL the process group when the checkpoint of step `step` starts (its state gathered, the staging
    name prepared, nothing written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        at = trainer.global_step == self.step and trainer.is_global_zero
        if at and fire_once(trainer.default_root_dir, f"killed-step{self.step}"):
            os.killpg(os.getpgid(0), signal.SIGKILL)


class PoisonSteps(L.Callback):
    """NaN input embeddings, hence a NaN loss and NaN gradients, in optimizer steps `steps` (1-based) on
    rank `rank` only: the other ranks see finite numbers of their own. At the end every rank's sum of
    its weights goes to `fault-weight-sums.json`, so a test can see that the ranks never diverged."""

    def __init__(self, steps: list[int], rank: int = 0) -> None:
        self.steps, self.rank = set(steps), rank
        self._hook: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._hook is None and trainer.global_step + 1 in self.steps and trainer.global_rank == self.rank:
            embeddings = pl_module.model.get_input_embeddings()
            self._hook = embeddings.register_forward_hook(lambda m, i, out: out * torch.nan)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._hook is not None and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._hook.remove()
            self._hook = None


    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        total = sum(p.detach().double().sum() for p in pl_module.parameters())
        sums = trainer.strategy.all_gather(total.reshape(1)).flatten().tolist()
        if trainer.is_global_zero:
            (Path(trainer.default_root_dir) / "fault-weight-sums.json").write_text(json.dumps(sums))


class DiskFullAfterStep(L.Callback):
    """From optimizer step `step` + 1 on, the disk counts as full: the checkpoint callback is asked to
    keep all of the free space free, so its real free-disk check refuses the next save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            free = shutil.disk_usage(trainer.checkpoint_callback.dirpath).free
            trainer.checkpoint_callback.free_disk_margin_gb = free / 1024**3
