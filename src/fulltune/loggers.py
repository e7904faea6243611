"""Logger builders where a YAML node alone can't decide (online vs offline W&B, a resumed W&B run), a
CSV logger that continues a resumed run's metrics.csv, and the end of a run's logging: the summary as
W&B summary metrics, one W&B run closed per job."""

from __future__ import annotations

import csv
import io
import netrc
import os
from argparse import Namespace
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, ListConfig, OmegaConf

from fulltune.atomic import write_text


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one continues it, header and all.
    When new columns appear the file is rewritten, through a temporary file: a crash then loses no row."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        write_text(Path(self.metrics_file_path), text.getvalue())


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger whose metrics.csv keeps every step of every segment of a resumed run: rows are appended.
    Steps after the checkpoint a run resumed from appear twice; the later row is the one that counts
    (`fulltune.report.read_history` reads it so)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_credentials_found() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes), for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class ConfigWandbLogger(WandbLogger):
    """A `WandbLogger` that logs OmegaConf values (the module's `model`, `finetune` hyper-parameters)
    as nested config: Lightning would turn them into their `str` and overwrite the resolved config."""

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        super().log_hyperparams({
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v
            for k, v in params.items()
        })


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> ConfigWandbLogger:
    """A W&B logger with a new W&B run for this job, or the run of the segment before when it resumes.

    `offline=None` means online only with credentials (`WANDB_API_KEY`, `wandb login`), under a
    `wandb agent` (`WANDB_SWEEP_ID`), or with `WANDB_MODE=online`, so runs without an account still
    log (sync them later with `wandb sync`). A run still open from an earlier job of this process
    (one that failed before `finish_loggers`) is closed as failed first: Lightning would otherwise
    log this job into it.
    """
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1)
    if offline is None:
        offline = not (wandb_credentials_found() or os.environ.get("WANDB_SWEEP_ID")
                       or os.environ.get("WANDB_MODE") == "online")
    if run_id := previous_wandb_id(Path(kwargs.get("save_dir") or ".")):
        kwargs |= {"id": run_id, "resume": "allow"}
    return ConfigWandbLogger(offline=offline, **kwargs)


def previous_wandb_id(save_dir: Path) -> str | None:
    """The id of the W&B run an earlier segment of this (resumed) run logged to, from its
    `wandb/[offline-]run-<time>-<id>` dirs: a resumed run logs on under the same id, offline too
    (`wandb sync` then joins the segments)."""
    runs = sorted((save_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def finish_loggers(loggers: Iterable[Any], summary: dict[str, Any]) -> None:
    """Set the run's final metrics (summary.json) as W&B summary metrics and close its W&B run, so
    the next job of a multirun gets its own. Other loggers keep summary.json beside their files."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary)
            logger.experiment.finish()
